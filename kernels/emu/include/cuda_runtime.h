// cuda_runtime.h for the SIMT emulator: the built-ins are in kernels/emu/fk_emu.h, included first.
#pragma once
