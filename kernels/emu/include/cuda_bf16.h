// cuda_bf16.h for the SIMT emulator (kernels/emu/fk_emu.h): see fk_emu_half.h.
#pragma once
#include "fk_emu_half.h"
