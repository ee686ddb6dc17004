// fk_emu_table.h: the launch table of an emulated family. build.rs generates, per family, a unit that
// includes the family's .cu files and then lists every kernel with FK_EMU_KERNEL; the runtime launches
// them by index with the argument bytes Rust passes (the same repr(C) structs as the CUDA launch).
#pragma once

#include <stddef.h>

#include <type_traits>
#include <utility>

#include "fk_emu_abi.h"

namespace fk_emu {

struct KernelEntry {
    fk_emu_kernel_info info;
    void (*invoke)(const void *const *args);
};

size_t fk_emu_table_size();
const KernelEntry &fk_emu_table_at(size_t i);

template <class F>
struct KernelTraits;
template <class... A>
struct KernelTraits<void (*)(A...)> {
    static constexpr unsigned n = sizeof...(A);
    template <void (*K)(A...), size_t... I>
    static void call(const void *const *args, std::index_sequence<I...>) {
        K(*static_cast<const typename std::remove_cv<A>::type *>(args[I])...);
    }
    static void sizes(uint32_t *out) {
        const uint32_t s[] = {0u, (uint32_t)sizeof(A)...};
        for (unsigned i = 0; i < n; ++i) out[i] = s[i + 1];
    }
};

template <auto K>
void invoke(const void *const *args) {
    typedef KernelTraits<decltype(K)> Tr;
    Tr::template call<K>(args, std::make_index_sequence<Tr::n>{});
}

template <auto K>
KernelEntry entry(const char *name, unsigned max_threads, unsigned cx, unsigned cy, unsigned cz) {
    typedef KernelTraits<decltype(K)> Tr;
    static_assert(Tr::n <= FK_EMU_MAX_ARGS, "too many kernel arguments for the emulator's table");
    KernelEntry e{};
    e.info.name = name;
    e.info.max_threads = max_threads;
    e.info.cluster[0] = cx;
    e.info.cluster[1] = cy;
    e.info.cluster[2] = cz;
    e.info.n_args = Tr::n;
    Tr::sizes(e.info.arg_size);
    e.invoke = &invoke<K>;
    return e;
}

}  // namespace fk_emu

#define FK_EMU_KERNEL(name, max_threads, cx, cy, cz) ::fk_emu::entry<&name>(#name, max_threads, cx, cy, cz)
#define FK_EMU_TABLE(...)                                                                       \
    namespace fk_emu {                                                                          \
    static const KernelEntry fk_emu_table[] = {__VA_ARGS__};                                    \
    size_t fk_emu_table_size() { return sizeof fk_emu_table / sizeof fk_emu_table[0]; }         \
    const KernelEntry &fk_emu_table_at(size_t i) { return fk_emu_table[i]; }                    \
    }
