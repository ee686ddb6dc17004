// fk_emu_runtime.cpp: the SIMT emulator's runtime. Compiled (without sanitizer instrumentation) into
// every emulated family library beside the kernels; see kernels/emu/README.md.
//
// A launch runs its blocks one after another on the calling OS thread; a cluster's blocks run together,
// one OS thread each. Each GPU thread of a block is a fiber with its own stack; the block's scheduler
// resumes its runnable fibers in the launch's schedule order, each running until it reaches a barrier,
// a warp collective, a cluster wait or its end. The scheduler then completes what can complete
// (collectives whose lanes all arrived, the block barrier once every live thread waits at it) and reports
// what never can: divergent barriers and collectives, masks naming exited lanes, deadlocks.
//
// Shared memory is thread-local storage of the family library: each OS thread (so each block running at
// a time) has its own copy of every static __shared__ variable and of the dynamic buffer fk_smem. At block
// start all of it is filled with 0xff bytes (NaN as floats, -1 as integers) and the bytes past the
// launch's dynamic size are poisoned for AddressSanitizer.
#include <dlfcn.h>
#include <link.h>
#include <pthread.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <condition_variable>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <numeric>
#include <string>
#include <thread>
#include <vector>

#include "fk_emu_runtime.h"
#include "fk_emu_mma.h"
#include "fk_emu_abi.h"
#include "fk_emu_table.h"

#ifndef FK_EMU_SANITIZER
#define FK_EMU_SANITIZER FK_EMU_SANITIZER_NONE
#endif

// The largest dynamic shared memory a block can be given (the H100/H200 opt-in limit, 227 KiB).
#define FK_EMU_MAX_DYN_SMEM (227u * 1024u)

// The dynamic shared-memory buffer every kernel declares as `extern __shared__ unsigned char fk_smem[]`.
alignas(128) __attribute__((visibility("hidden"))) thread_local unsigned char fk_smem[FK_EMU_MAX_DYN_SMEM];

// Sanitizer interfaces, present only when a sanitizer runtime is loaded (weak: null otherwise), and the
// dynamic linker's TLS lookup: symbols of other objects (default visibility).
#pragma GCC visibility push(default)
extern "C" {
void __sanitizer_start_switch_fiber(void **fake_stack_save, const void *bottom, size_t size) __attribute__((weak));
void __sanitizer_finish_switch_fiber(void *fake_stack_save, const void **bottom_old, size_t *size_old)
    __attribute__((weak));
void __asan_poison_memory_region(const volatile void *addr, size_t size) __attribute__((weak));
void __asan_unpoison_memory_region(const volatile void *addr, size_t size) __attribute__((weak));
void *__tsan_get_current_fiber(void) __attribute__((weak));
void *__tsan_create_fiber(unsigned flags) __attribute__((weak));
void __tsan_destroy_fiber(void *fiber) __attribute__((weak));
void __tsan_switch_to_fiber(void *fiber, unsigned flags) __attribute__((weak));
void __tsan_set_fiber_name(void *fiber, const char *name) __attribute__((weak));
void __tsan_acquire(void *addr) __attribute__((weak));
void __tsan_release(void *addr) __attribute__((weak));
struct fk_tls_index {
    unsigned long module, offset;
};
void *__tls_get_addr(fk_tls_index *);
}
#pragma GCC visibility pop

// ---------------------------------------------------------------------------------------------------
// Context switch.
#if defined(__x86_64__)
extern "C" void fk_emu_switch(void **save_sp, void *new_sp);
extern "C" void fk_emu_fiber_start();
asm(R"(
.text
.globl fk_emu_switch
.hidden fk_emu_switch
.type fk_emu_switch,@function
fk_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
.size fk_emu_switch,.-fk_emu_switch

.globl fk_emu_fiber_start
.hidden fk_emu_fiber_start
.type fk_emu_fiber_start,@function
fk_emu_fiber_start:
    movq %r12, %rdi
    andq $-16, %rsp
    callq *%r13
    ud2
.size fk_emu_fiber_start,.-fk_emu_fiber_start
)");
#else
#include <ucontext.h>
#endif

namespace fk_emu {

namespace {

enum State { RUNNABLE, AT_BARRIER, AT_COLLECTIVE, AT_CLUSTER_WAIT, DONE };

struct CpCopy {
    unsigned char *dst;
    unsigned size;
    unsigned char data[16];
};

struct BlockRun;

struct Fiber {
    Thread t;  // what the kernel sees through self()
    void *sp = nullptr;
#if !defined(__x86_64__)
    ucontext_t ctx;
#endif
    char *stack = nullptr;  // lowest usable byte (a guard page lies below)
    size_t stack_size = 0;
    void *tsan_fiber = nullptr;
    void *asan_fake = nullptr;
    State state = DONE;
    const char *file = nullptr;
    int line = 0;
    int bar_kind = 0;
    int bar_pred = 0;
    int bar_result = 0;
    Collective *coll = nullptr;
    unsigned cluster_arrived = 0;  // barrier.cluster.arrive count
    unsigned cluster_waited = 0;   // barrier.cluster.wait count
    std::vector<CpCopy> cp_pending;
    std::vector<size_t> cp_group_end;  // committed groups: end index into cp_pending
    BlockRun *run = nullptr;
    struct Tls *home = nullptr;  // the OS thread's runtime state (no TLS lookup on the switch path)
    char tsan_park = 0;          // released at every park: what an aborted launch's cleanup acquires
};

struct Launch;

// A cluster in flight: its blocks run on separate OS threads and meet here.
struct ClusterRun {
    std::mutex mu;
    std::condition_variable cv;
    unsigned size = 1;
    std::vector<unsigned> arrived;  // per rank: completed block-level arrivals
    std::vector<bool> exited;
    std::vector<char *> tls_base;
    std::vector<bool> stuck;  // rank waits for the cluster and can do nothing else
    std::vector<std::string> stuck_desc;
    // Distributed shared memory: per target rank, the latest cluster phase (barriers its reader had
    // passed) in which another block read or wrote it, and where. A block may exit only after arriving
    // at a later phase, or a reader may find it gone: checked at its exit, whatever the timing.
    std::vector<int> accessed_in_phase;  // -1: never
    std::vector<std::string> accessed_at;
    unsigned completed = 0;   // phases every non-exited block has arrived at
    bool failed = false;
    std::string error;
    char tsan_sync = 0;  // ThreadSanitizer sync object of the cluster barrier

    void reset(unsigned n) {
        size = n;
        arrived.assign(n, 0);
        exited.assign(n, false);
        tls_base.assign(n, nullptr);
        stuck.assign(n, false);
        stuck_desc.assign(n, std::string());
        accessed_in_phase.assign(n, -1);
        accessed_at.assign(n, std::string());
        completed = 0;
        failed = false;
        error.clear();
    }
    // Phases complete for every non-exited block (caller holds mu).
    void recompute() {
        unsigned c = ~0u;
        for (unsigned r = 0; r < size; ++r)
            if (!exited[r]) c = std::min(c, arrived[r]);
        if (c == ~0u) c = ~0u - 1;  // every block exited: any phase is complete
        if (c > completed) {
            completed = c;
            std::fill(stuck.begin(), stuck.end(), false);
        }
        cv.notify_all();  // stuck ranks re-check for a deadlock
    }
};

struct Launch {
    const KernelEntry *kernel;
    const fk_emu_launch_desc *desc;
    LaunchGeom geom;
    unsigned threads;  // per block
    unsigned cluster_size;
    fk_emu_launch_stats stats;
    std::mutex stats_mu;
};

struct BlockRun {
    Block blk;
    Launch *launch = nullptr;
    ClusterRun *cluster = nullptr;
    std::vector<Fiber *> fibers;
    unsigned n = 0;
    unsigned live = 0;
    unsigned cluster_published = 0;
    char *tls_base = nullptr;
    bool failed = false;
    std::string error;
    uint64_t rng = 0;
    fk_emu_launch_stats stats{};
    char tsan_start = 0, tsan_end = 0, tsan_bar = 0;
    char tsan_warp[32] = {};
};

// The OS thread's runtime state: the one thread_local of the runtime, kept out of the shared-memory
// poisoning (everything else in this library's thread-local storage is shared memory).
void tsan_acquire(void *p);

struct Pool {
    std::vector<Fiber *> fibers;  // fibers (and their stacks), reused across blocks and launches
    size_t stack_size = 0;
    void clear();
};

// Plain data (no constructor or destructor), so a kernel's every access to it is a bare TLS load with
// no initialisation guard; the fiber pool is freed at thread exit through a pthread key.
struct Tls {
    Fiber *cur;
    BlockRun *block;  // the block this OS thread runs (fiber and scheduler side alike)
    void *sched_sp;
#if !defined(__x86_64__)
    ucontext_t sched_ctx;
#endif
    void *sched_tsan;
    void *sched_fake;
    const void *sched_stack_bottom;
    size_t sched_stack_size;
    Pool *pool;
};
thread_local Tls tls;

pthread_key_t g_pool_key;
std::once_flag g_pool_key_once;

void Pool::clear() {
    for (Fiber *f : fibers) {
        tsan_acquire(&f->tsan_park);  // a fiber abandoned by a failed launch last ran before its park
        if (f->tsan_fiber && __tsan_destroy_fiber) __tsan_destroy_fiber(f->tsan_fiber);
        munmap(f->stack - 4096, f->stack_size + 4096);
        delete f;
    }
    fibers.clear();
}

Pool &thread_pool() {
    if (!tls.pool) {
        std::call_once(g_pool_key_once, [] {
            pthread_key_create(&g_pool_key, [](void *p) {
                Pool *pool = static_cast<Pool *>(p);
                pool->clear();
                delete pool;
            });
        });
        tls.pool = new Pool();
        pthread_setspecific(g_pool_key, tls.pool);
    }
    return *tls.pool;
}

// ---------------------------------------------------------------------------------------------------
// Thread-local storage of this library: where a block's shared memory lives.
struct ModuleTls {
    unsigned long modid = 0;
    size_t size = 0;
    bool ok = false;
};
ModuleTls g_module;
std::once_flag g_module_once;

int find_module_tls(struct dl_phdr_info *info, size_t, void *data) {
    Dl_info self_info;
    if (!dladdr((void *)&find_module_tls, &self_info)) return 0;
    if ((void *)info->dlpi_addr != self_info.dli_fbase) return 0;
    for (int i = 0; i < info->dlpi_phnum; ++i) {
        if (info->dlpi_phdr[i].p_type == PT_TLS) {
            ModuleTls *m = static_cast<ModuleTls *>(data);
            m->modid = info->dlpi_tls_modid;
            m->size = info->dlpi_phdr[i].p_memsz;
            m->ok = m->modid != 0;
            return 1;
        }
    }
    return 0;
}

const ModuleTls &module_tls() {
    std::call_once(g_module_once, [] { dl_iterate_phdr(find_module_tls, &g_module); });
    return g_module;
}

char *thread_tls_base() {
    (void)tls.cur;  // make sure this thread's block of the library's TLS exists
    fk_tls_index ti{module_tls().modid, 0};
    return static_cast<char *>(__tls_get_addr(&ti));
}

bool asan() { return __asan_poison_memory_region != nullptr; }
bool tsan() { return __tsan_switch_to_fiber != nullptr; }
void tsan_acquire(void *p) {
    if (__tsan_acquire) __tsan_acquire(p);
}
void tsan_release(void *p) {
    if (__tsan_release) __tsan_release(p);
}

// Fills this thread's shared memory with 0xff: every static __shared__ variable, and the first `dyn`
// bytes of fk_smem; the rest of fk_smem is poisoned for AddressSanitizer.
void poison_shared(char *base, size_t size, uint64_t dyn) {
    char *const smem = reinterpret_cast<char *>(fk_smem);
    char *const rt = reinterpret_cast<char *>(&tls);
    struct Hole {
        char *lo, *hi;
    } holes[2] = {{smem, smem + FK_EMU_MAX_DYN_SMEM}, {rt, rt + sizeof(Tls)}};
    if (holes[1].lo < holes[0].lo) std::swap(holes[0], holes[1]);
    char *p = base, *end = base + size;
    for (const Hole &h : holes) {
        if (h.lo > p) memset(p, 0xff, (size_t)(std::min(h.lo, end) - p));
        p = std::max(p, h.hi);
    }
    if (p < end) memset(p, 0xff, (size_t)(end - p));
    if (asan()) __asan_unpoison_memory_region(fk_smem, FK_EMU_MAX_DYN_SMEM);
    memset(fk_smem, 0xff, dyn);
    if (asan() && dyn < FK_EMU_MAX_DYN_SMEM) __asan_poison_memory_region(fk_smem + dyn, FK_EMU_MAX_DYN_SMEM - dyn);
}

void unpoison_dynamic() {
    if (asan()) __asan_unpoison_memory_region(fk_smem, FK_EMU_MAX_DYN_SMEM);
}

// ---------------------------------------------------------------------------------------------------
// Messages.
std::string fmt(const char *f, ...) __attribute__((format(printf, 1, 2)));
std::string fmt(const char *f, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, f);
    vsnprintf(buf, sizeof buf, f, ap);
    va_end(ap);
    return buf;
}

const char *base_name(const char *path) {
    if (!path) return "?";
    const char *s = strrchr(path, '/');
    return s ? s + 1 : path;
}

std::string where(const char *file, int line) { return fmt("%s:%d", base_name(file), line); }

std::string block_name(const BlockRun &b) {
    std::string s = fmt("block (%u, %u, %u)", b.blk.idx.x, b.blk.idx.y, b.blk.idx.z);
    if (b.cluster) s += fmt(" (cluster rank %u)", b.blk.cluster_rank);
    return s;
}

std::string thread_name(const Fiber *f) {
    return fmt("thread (%u, %u, %u) [warp %u lane %u]", f->t.tid.x, f->t.tid.y, f->t.tid.z, f->t.warp, f->t.lane);
}

void fail(BlockRun &b, const std::string &msg) {
    if (b.failed) return;
    b.failed = true;
    b.error = fmt("kernel %s, %s: ", b.launch->kernel->info.name, block_name(b).c_str()) + msg;
}

// Lanes as ranges: "0-15, 17".
std::string lanes_text(unsigned mask) {
    std::string s;
    for (int i = 0; i < 32;) {
        if (!((mask >> i) & 1u)) {
            ++i;
            continue;
        }
        int j = i;
        while (j + 1 < 32 && ((mask >> (j + 1)) & 1u)) ++j;
        if (!s.empty()) s += ", ";
        s += i == j ? fmt("%d", i) : fmt("%d-%d", i, j);
        i = j + 1;
    }
    return s.empty() ? "none" : s;
}

// ---------------------------------------------------------------------------------------------------
// Fibers.
void fiber_main(Fiber *f);

void switch_to_fiber(Tls &t, Fiber *f) {
    t.cur = f;
    if (__sanitizer_start_switch_fiber) __sanitizer_start_switch_fiber(&t.sched_fake, f->stack, f->stack_size);
    if (tsan()) __tsan_switch_to_fiber(f->tsan_fiber, 1 /* no synchronisation: races stay visible */);
#if defined(__x86_64__)
    fk_emu_switch(&t.sched_sp, f->sp);
#else
    swapcontext(&t.sched_ctx, &f->ctx);
#endif
    if (__sanitizer_finish_switch_fiber) __sanitizer_finish_switch_fiber(t.sched_fake, nullptr, nullptr);
    t.cur = nullptr;
}

void switch_to_scheduler(Fiber *f, bool final) {
    Tls &t = *f->home;
    if (__sanitizer_start_switch_fiber)
        __sanitizer_start_switch_fiber(final ? nullptr : &f->asan_fake, t.sched_stack_bottom, t.sched_stack_size);
    if (tsan()) __tsan_switch_to_fiber(t.sched_tsan, 1);
#if defined(__x86_64__)
    fk_emu_switch(&f->sp, t.sched_sp);
#else
    swapcontext(&f->ctx, &t.sched_ctx);
#endif
    if (__sanitizer_finish_switch_fiber) __sanitizer_finish_switch_fiber(f->asan_fake, nullptr, nullptr);
}

// Parks the running fiber (its state already set) until the scheduler resumes it.
void park(Fiber *f) {
    if (tsan()) __tsan_release(&f->tsan_park);
    switch_to_scheduler(f, false);
}

size_t default_stack_kib() { return FK_EMU_SANITIZER == FK_EMU_SANITIZER_NONE ? 64 : 512; }

#if !defined(__x86_64__)
void fiber_main_trampoline(unsigned lo, unsigned hi);
#endif

// The pool's fiber i, with a fresh stack frame that starts the kernel.
Fiber *fiber_for(unsigned i, size_t stack_size) {
    Pool &pool = thread_pool();
    if (pool.stack_size != stack_size) {
        pool.clear();
        pool.stack_size = stack_size;
    }
    while (pool.fibers.size() <= i) {
        Fiber *f = new Fiber();
        void *m = mmap(nullptr, stack_size + 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                       -1, 0);
        if (m == MAP_FAILED) {
            delete f;
            return nullptr;
        }
        mprotect(m, 4096, PROT_NONE);  // guard page: a stack overflow faults instead of corrupting
        f->stack = static_cast<char *>(m) + 4096;
        f->stack_size = stack_size;
        if (tsan()) {
            f->tsan_fiber = __tsan_create_fiber(0);
            if (__tsan_set_fiber_name) {
                char name[64];
                snprintf(name, sizeof name, "GPU thread %zu", pool.fibers.size());
                __tsan_set_fiber_name(f->tsan_fiber, name);
            }
        }
        pool.fibers.push_back(f);
    }
    Fiber *f = pool.fibers[i];
    f->home = &tls;
    if (asan()) __asan_unpoison_memory_region(f->stack, f->stack_size);
    f->asan_fake = nullptr;
#if defined(__x86_64__)
    // Stack tops staggered by a cache line per fiber: equally spaced tops would all fall into one L1
    // set, and every switch would miss.
    uint64_t *top = reinterpret_cast<uint64_t *>(f->stack + f->stack_size - 64 * (i % 61));
    // Frame popped by fk_emu_switch: r15 r14 r13 r12 rbx rbp, then the return address. (The floating-point
    // control words are not switched: no kernel changes its rounding mode.)
    uint64_t *sp = top - 8;
    sp[0] = 0;                                             // r15
    sp[1] = 0;                                             // r14
    sp[2] = reinterpret_cast<uint64_t>(&fiber_main);       // r13: the function to call
    sp[3] = reinterpret_cast<uint64_t>(f);                 // r12: its argument
    sp[4] = 0;                                             // rbx
    sp[5] = 0;                                             // rbp
    sp[6] = reinterpret_cast<uint64_t>(&fk_emu_fiber_start);
    f->sp = sp;
#else
    getcontext(&f->ctx);
    f->ctx.uc_stack.ss_sp = f->stack;
    f->ctx.uc_stack.ss_size = f->stack_size;
    f->ctx.uc_link = nullptr;
    const uintptr_t fp = reinterpret_cast<uintptr_t>(f);
    makecontext(&f->ctx, (void (*)())fiber_main_trampoline, 2, (unsigned)(fp & 0xffffffffu), (unsigned)(fp >> 32));
#endif
    return f;
}

#if !defined(__x86_64__)
void fiber_main_trampoline(unsigned lo, unsigned hi) {
    fiber_main(reinterpret_cast<Fiber *>(((uintptr_t)hi << 32) | lo));
}
#endif

void land_cp_async(Fiber *f, size_t upto) {
    for (size_t i = 0; i < upto; ++i) memcpy(f->cp_pending[i].dst, f->cp_pending[i].data, f->cp_pending[i].size);
    f->cp_pending.erase(f->cp_pending.begin(), f->cp_pending.begin() + (ptrdiff_t)upto);
    for (size_t &e : f->cp_group_end) e -= upto;
}

void fiber_main(Fiber *f) {
    if (__sanitizer_finish_switch_fiber)
        __sanitizer_finish_switch_fiber(nullptr, &f->home->sched_stack_bottom, &f->home->sched_stack_size);
    BlockRun &b = *f->run;
    tsan_acquire(&b.tsan_start);
    b.launch->kernel->invoke(b.launch->desc->args);
    // Copies never waited for are dropped: nothing may read them without a wait (a sibling that did,
    // after this thread exited, would otherwise see them land).
    f->cp_pending.clear();
    f->cp_group_end.clear();
    tsan_release(&b.tsan_end);
    f->state = DONE;
    switch_to_scheduler(f, true);
    __builtin_trap();
}

// ---------------------------------------------------------------------------------------------------
// The block scheduler.
struct Scheduler {
    BlockRun &b;
    unsigned schedule;
    Tls &t;

    Fiber *fib(unsigned i) { return b.fibers[i]; }
    unsigned nwarps() const { return (b.n + 31) / 32; }
    unsigned warp_lanes(unsigned w) const { return std::min(32u, b.n - 32 * w); }
    unsigned warp_exists_mask(unsigned w) const {
        const unsigned k = warp_lanes(w);
        return k == 32 ? 0xffffffffu : ((1u << k) - 1u);
    }

    void resume(Fiber *f) {
        b.stats.switches += 2;  // into the fiber and back
        switch_to_fiber(t, f);
        if (f->state == DONE) {
            b.live--;
        }
    }

    uint64_t next_random() {
        b.rng ^= b.rng << 13;
        b.rng ^= b.rng >> 7;
        b.rng ^= b.rng << 17;
        return b.rng;
    }

    // Runs every runnable lane of warp w once, in the schedule's lane order. Returns whether any ran.
    bool run_warp_once(unsigned w) {
        bool any = false;
        const unsigned k = warp_lanes(w);
        for (unsigned j = 0; j < k; ++j) {
            const unsigned lane = schedule == FK_EMU_SCHEDULE_WARP_GREEDY_REVERSED ? k - 1 - j : j;
            Fiber *f = fib(32 * w + lane);
            if (f->state == RUNNABLE) {
                resume(f);
                any = true;
                if (b.failed) return true;
            }
        }
        return any;
    }

    // Completes the warp collectives of warp w whose lanes have all arrived. Returns whether any did.
    bool resolve_warp(unsigned w) {
        const unsigned exists = warp_exists_mask(w);
        unsigned at = 0, done = 0;
        for (unsigned lane = 0; lane < 32; ++lane) {
            if (!((exists >> lane) & 1u)) continue;
            const State st = fib(32 * w + lane)->state;
            if (st == AT_COLLECTIVE) at |= 1u << lane;
            else if (st == DONE) done |= 1u << lane;
        }
        if (!at) return false;
        bool any = false;
        unsigned pending = at;
        while (pending) {
            const unsigned lane = (unsigned)__builtin_ctz(pending);
            Fiber *f = fib(32 * w + lane);
            const Collective *c = f->coll;
            const unsigned mask = c->mask;
            if (!((mask >> lane) & 1u)) {
                fail(b, fmt("%s calls %s at %s with mask 0x%08x, which does not name its own lane", thread_name(f).c_str(),
                            op_name(c->op), where(f->file, f->line).c_str(), mask));
                return true;
            }
            if (mask & ~exists) {
                fail(b, fmt("%s at %s: mask 0x%08x names lanes %s, which do not exist (the block has %u threads)",
                            op_name(c->op), where(f->file, f->line).c_str(), mask, lanes_text(mask & ~exists).c_str(),
                            b.n));
                return true;
            }
            if (mask & done) {
                fail(b, fmt("warp %u: %s at %s with mask 0x%08x names lanes %s, which have exited", w, op_name(c->op),
                            where(f->file, f->line).c_str(), mask, lanes_text(mask & done).c_str()));
                return true;
            }
            pending &= ~(1u << lane);
            if ((at & mask) != mask) continue;  // some lane of the mask is still running (or blocked elsewhere)
            // Every lane of the mask waits at a collective: this one, a different group's (one whose mask
            // leaves this lane out: it completes on its own), or a divergence.
            Collective *lanes[32] = {};
            bool other_group = false;
            for (unsigned m = mask; m; m &= m - 1) {
                const unsigned l = (unsigned)__builtin_ctz(m);
                Fiber *g = fib(32 * w + l);
                const Collective *gc = g->coll;
                if (gc->op == c->op && gc->mask == mask && g->line == f->line && g->file == f->file) {
                    lanes[l] = g->coll;
                    continue;
                }
                if (!((gc->mask >> lane) & 1u)) {
                    other_group = true;
                    continue;
                }
                fail(b, fmt("warp %u: divergent warp collective: lane %u waits at %s (%s, mask 0x%08x), lane %u at %s "
                            "(%s, mask 0x%08x)",
                            w, lane, where(f->file, f->line).c_str(), op_name(c->op), mask, l,
                            where(g->file, g->line).c_str(), op_name(gc->op), gc->mask));
                return true;
            }
            if (other_group) continue;
            char err[512];
            err[0] = 0;
            c->exec(lanes, mask, err, sizeof err);
            if (err[0]) {
                fail(b, fmt("warp %u: %s at %s (mask 0x%08x): %s", w, op_name(c->op), where(f->file, f->line).c_str(), mask,
                            err));
                return true;
            }
            for (unsigned m = mask; m; m &= m - 1) fib(32 * w + (unsigned)__builtin_ctz(m))->state = RUNNABLE;
            at &= ~mask;
            pending &= ~mask;
            b.stats.warp_ops++;
            any = true;
        }
        return any;
    }

    // The block barrier completes once every live thread waits at it.
    bool resolve_barrier() {
        Fiber *first = nullptr;
        int acc = 0;
        for (unsigned i = 0; i < b.n; ++i) {
            Fiber *f = fib(i);
            if (f->state == DONE) continue;
            if (f->state != AT_BARRIER) return false;
            if (!first) {
                first = f;
                acc = f->bar_kind == BAR_AND ? 1 : 0;
            } else if (f->line != first->line || f->file != first->file || f->bar_kind != first->bar_kind) {
                fail(b, fmt("divergent __syncthreads: %s waits at %s, %s at %s", thread_name(first).c_str(),
                            where(first->file, first->line).c_str(), thread_name(f).c_str(),
                            where(f->file, f->line).c_str()));
                return true;
            }
            switch (f->bar_kind) {
            case BAR_COUNT: acc += f->bar_pred != 0; break;
            case BAR_AND: acc = acc && f->bar_pred != 0; break;
            case BAR_OR: acc = acc || f->bar_pred != 0; break;
            default: break;
            }
        }
        if (!first) return false;
        for (unsigned i = 0; i < b.n; ++i) {
            Fiber *f = fib(i);
            if (f->state == AT_BARRIER) {
                f->bar_result = acc;
                f->state = RUNNABLE;
            }
        }
        b.stats.barriers++;
        return true;
    }

    // Publishes this block's cluster arrivals; wakes fibers whose cluster phase completed.
    bool resolve_cluster() {
        ClusterRun *c = b.cluster;
        if (!c) return false;
        unsigned arrived = ~0u;
        for (unsigned i = 0; i < b.n; ++i)
            if (fib(i)->state != DONE) arrived = std::min(arrived, fib(i)->cluster_arrived);
        const bool exited = arrived == ~0u;
        unsigned completed;
        {
            std::lock_guard<std::mutex> lk(c->mu);
            if (exited) {
                const unsigned r = b.blk.cluster_rank;
                if (!c->exited[r]) {
                    c->exited[r] = true;
                    if (c->accessed_in_phase[r] >= (int)b.cluster_published) {
                        const std::string m =
                            fmt("block (cluster rank %u) exited after %u cluster barrier(s), but another block reads "
                                "its shared memory after barrier %d (%s): it needs a cluster barrier after those "
                                "reads before it exits",
                                r, b.cluster_published, c->accessed_in_phase[r], c->accessed_at[r].c_str());
                        if (!c->failed) {
                            c->failed = true;
                            c->error = fmt("kernel %s, %s: ", b.launch->kernel->info.name, block_name(b).c_str()) + m;
                        }
                        fail(b, m);
                    }
                    c->recompute();
                }
            } else if (arrived > b.cluster_published) {
                b.cluster_published = arrived;
                c->arrived[b.blk.cluster_rank] = arrived;
                c->recompute();
            }
            completed = c->completed;
        }
        bool any = false;
        for (unsigned i = 0; i < b.n; ++i) {
            Fiber *f = fib(i);
            if (f->state == AT_CLUSTER_WAIT && f->cluster_waited <= completed) {
                f->state = RUNNABLE;
                any = true;
            }
        }
        return any;
    }

    // Nothing can run: wait for the other blocks of the cluster, or report a deadlock.
    bool wait_for_cluster() {
        ClusterRun *c = b.cluster;
        bool waiting = false;
        unsigned need = ~0u;
        for (unsigned i = 0; i < b.n; ++i) {
            Fiber *f = fib(i);
            if (f->state == AT_CLUSTER_WAIT) {
                waiting = true;
                need = std::min(need, f->cluster_waited);
            }
        }
        if (!c || !waiting) return false;
        std::string mine = block_state();
        std::unique_lock<std::mutex> lk(c->mu);
        const unsigned rank = b.blk.cluster_rank;
        c->stuck[rank] = true;
        c->stuck_desc[rank] = mine;
        for (;;) {
            if (c->failed) {
                fail(b, "another block of the cluster failed: " + c->error);
                return false;
            }
            if (c->completed >= need) {
                c->stuck[rank] = false;
                return true;
            }
            bool all_stuck = true;
            for (unsigned r = 0; r < c->size; ++r)
                if (!c->exited[r] && !c->stuck[r]) all_stuck = false;
            if (all_stuck) {
                std::string who;
                for (unsigned r = 0; r < c->size; ++r)
                    who += fmt("%srank %u: %s", r ? "; " : "", r,
                               c->exited[r] ? "exited" : c->stuck_desc[r].c_str());
                c->failed = true;
                c->error = fmt("cluster deadlock: every block waits at barrier.cluster for a phase some block never "
                               "arrives at (%s)",
                               who.c_str());
                c->cv.notify_all();
                fail(b, c->error);
                return false;
            }
            c->cv.wait(lk);
        }
    }

    std::string describe(const Fiber *f) const {
        switch (f->state) {
        case RUNNABLE: return "runnable";
        case DONE: return "exited";
        case AT_BARRIER: return fmt("wait at __syncthreads (%s)", where(f->file, f->line).c_str());
        case AT_COLLECTIVE:
            return fmt("wait at %s (%s, mask 0x%08x)", op_name(f->coll->op), where(f->file, f->line).c_str(),
                       f->coll->mask);
        case AT_CLUSTER_WAIT: return fmt("wait at barrier.cluster (%s)", where(f->file, f->line).c_str());
        }
        return "?";
    }

    // "threads 0-31: wait at __syncthreads (x.cu:10); threads 32-63: exited"
    std::string block_state() const {
        std::string msg;
        unsigned i = 0;
        while (i < b.n) {
            const std::string d = describe(b.fibers[i]);
            unsigned j = i;
            while (j + 1 < b.n && describe(b.fibers[j + 1]) == d) ++j;
            if (!msg.empty()) msg += "; ";
            msg += i == j ? fmt("thread %u: %s", i, d.c_str()) : fmt("threads %u-%u: %s", i, j, d.c_str());
            i = j + 1;
        }
        return msg;
    }

    void report_deadlock() { fail(b, "deadlock: no thread of the block can proceed; " + block_state()); }

    bool run() {
        for (;;) {
            bool progressed = false;
            if (schedule == FK_EMU_SCHEDULE_ROUND_ROBIN || schedule == FK_EMU_SCHEDULE_RANDOM) {
                if (schedule == FK_EMU_SCHEDULE_RANDOM) {
                    std::vector<unsigned> order;
                    for (unsigned i = 0; i < b.n; ++i)
                        if (fib(i)->state == RUNNABLE) order.push_back(i);
                    for (size_t k = order.size(); k > 1; --k) std::swap(order[k - 1], order[next_random() % k]);
                    for (unsigned i : order) {
                        resume(fib(i));
                        progressed = true;
                        if (b.failed) return false;
                    }
                } else {
                    for (unsigned i = 0; i < b.n; ++i) {
                        if (fib(i)->state == RUNNABLE) {
                            resume(fib(i));
                            progressed = true;
                            if (b.failed) return false;
                        }
                    }
                }
                for (unsigned w = 0; w < nwarps(); ++w) {
                    progressed |= resolve_warp(w);
                    if (b.failed) return false;
                }
            } else {
                // Warp-greedy: each warp runs as far as it can before the next one starts.
                const unsigned nw = nwarps();
                for (unsigned k = 0; k < nw; ++k) {
                    const unsigned w = schedule == FK_EMU_SCHEDULE_WARP_GREEDY_REVERSED ? nw - 1 - k : k;
                    for (;;) {
                        bool any = run_warp_once(w);
                        if (b.failed) return false;
                        any |= resolve_warp(w);
                        if (b.failed) return false;
                        if (!any) break;
                        progressed = true;
                    }
                }
            }
            if (b.live == 0) {
                resolve_cluster();  // publish the exit (and check it)
                return !b.failed;
            }
            progressed |= resolve_barrier();
            if (b.failed) return false;
            progressed |= resolve_cluster();
            if (progressed) continue;
            if (wait_for_cluster()) continue;
            if (b.failed) return false;
            report_deadlock();
            return false;
        }
    }
};

// Runs one block on this OS thread.
bool run_block(Launch &L, BlockRun &b, uint3 idx, unsigned rank, uint3 cidx, ClusterRun *cluster) {
    const fk_emu_launch_desc &d = *L.desc;
    b.launch = &L;
    b.cluster = cluster;
    b.blk.idx = idx;
    b.blk.geom = &L.geom;
    b.blk.cluster_rank = rank;
    b.blk.cluster_idx = cidx;
    b.n = L.threads;
    b.live = L.threads;
    b.cluster_published = 0;
    b.failed = false;
    b.error.clear();
    b.rng = (d.seed ^ (0x9e3779b97f4a7c15ull * (1 + idx.x + 65536ull * (idx.y + 65536ull * idx.z)))) | 1;
    b.tls_base = thread_tls_base();
    tls.block = &b;
    const size_t stack = (d.fiber_stack_kib ? d.fiber_stack_kib : default_stack_kib()) * 1024;
    b.fibers.resize(L.threads);
    for (unsigned i = 0; i < L.threads; ++i) {
        Fiber *f = fiber_for(i, stack);
        if (!f) {
            fail(b, fmt("cannot map the stack of thread %u (%zu KiB)", i, stack / 1024));
            return false;
        }
        f->run = &b;
        f->t.tid = uint3{i % L.geom.block.x, (i / L.geom.block.x) % L.geom.block.y,
                         i / (L.geom.block.x * L.geom.block.y)};
        f->t.linear = i;
        f->t.lane = i % 32;
        f->t.warp = i / 32;
        f->t.block = &b.blk;
        f->state = RUNNABLE;
        f->coll = nullptr;
        f->cluster_arrived = f->cluster_waited = 0;
        f->cp_pending.clear();
        f->cp_group_end.clear();
        b.fibers[i] = f;
    }
    // One sync object chain per OS thread: this block's threads start after everything the previous
    // block (and the host) wrote, and none of them is ordered after a sibling by it.
    tsan_acquire(&b.tsan_end);
    poison_shared(b.tls_base, module_tls().size, d.dynamic_smem);
    tsan_release(&b.tsan_start);
    if (tsan() && !tls.sched_tsan) tls.sched_tsan = __tsan_get_current_fiber();
    Scheduler s{b, d.schedule, tls};
    const bool ok = s.run();
    tsan_acquire(&b.tsan_end);
    if (!ok)
        for (Fiber *f : b.fibers) tsan_acquire(&f->tsan_park);  // abandoned mid-kernel: order their last steps
    unpoison_dynamic();
    b.stats.blocks++;
    b.stats.threads += L.threads;
    return ok;
}

// A reusable barrier for the OS threads of a cluster launch.
struct ThreadBarrier {
    std::mutex mu;
    std::condition_variable cv;
    unsigned n, count = 0, gen = 0;
    explicit ThreadBarrier(unsigned k) : n(k) {}
    void wait() {
        std::unique_lock<std::mutex> lk(mu);
        const unsigned g = gen;
        if (++count == n) {
            count = 0;
            gen++;
            cv.notify_all();
        } else {
            cv.wait(lk, [&] { return gen != g; });
        }
    }
};

void add_stats(fk_emu_launch_stats &a, const fk_emu_launch_stats &s) {
    a.blocks += s.blocks;
    a.threads += s.threads;
    a.switches += s.switches;
    a.barriers += s.barriers;
    a.warp_ops += s.warp_ops;
    a.cluster_barriers += s.cluster_barriers;
}

// Helper OS threads for the cluster ranks past the first, kept for the process's life: a cluster
// launch borrows C - 1 of them (their fiber pools and, under ThreadSanitizer, their fiber states stay
// warm from one launch to the next).
//
// The pool never grows past kMaxWorkers threads (the largest cluster, 8 blocks, less the calling thread):
// a launch that finds too few idle waits for another launch to return them. Without the cap, concurrent
// cluster launches (the test harness runs tests on several threads) each made their own helpers, and
// every helper keeps a warm pool of up to a block of fibers: two 8-block launches of 512-thread blocks
// kept 16 threads x 512 fibers alive, past ThreadSanitizer's limit of 8128 threads and fibers together
// ("Thread limit (8128 threads) exceeded. Dying.", exit 66; seen once in CI, timing-dependent). With
// the cap: at most 7 x 1024 helper fibers, plus one block's fibers per calling thread.
constexpr unsigned kMaxWorkers = 7;

struct Worker {
    std::mutex mu;
    std::condition_variable cv;
    std::function<void()> job;
    bool busy = false;
};

struct WorkerPool {
    std::mutex mu;
    std::condition_variable cv;  // signalled when helpers return to `idle`
    std::vector<Worker *> idle;
    unsigned created = 0;
};
WorkerPool *g_workers = new WorkerPool();  // never freed: workers may outlive static destructors

Worker *new_worker() {
    Worker *w = new Worker();
    std::thread([w] {
        for (;;) {
            std::function<void()> job;
            {
                std::unique_lock<std::mutex> lk(w->mu);
                w->cv.wait(lk, [w] { return (bool)w->job; });
                job = std::move(w->job);
                w->job = nullptr;
            }
            job();
            {
                std::lock_guard<std::mutex> lk(w->mu);
                w->busy = false;
            }
            w->cv.notify_all();
        }
    }).detach();
    return w;
}

// Takes n <= kMaxWorkers helpers at once, all or none (two launches never each hold part of what the
// other waits for, so waiting cannot deadlock), creating new ones only up to the cap.
std::vector<Worker *> borrow_workers(unsigned n) {
    std::vector<Worker *> out;
    unsigned make = 0;
    {
        std::unique_lock<std::mutex> lk(g_workers->mu);
        g_workers->cv.wait(lk, [n] { return g_workers->idle.size() + (kMaxWorkers - g_workers->created) >= n; });
        while (out.size() < n && !g_workers->idle.empty()) {
            out.push_back(g_workers->idle.back());
            g_workers->idle.pop_back();
        }
        make = n - (unsigned)out.size();
        g_workers->created += make;
    }
    for (unsigned i = 0; i < make; ++i) out.push_back(new_worker());
    return out;
}

void start_job(Worker *w, std::function<void()> job) {
    {
        std::lock_guard<std::mutex> lk(w->mu);
        w->busy = true;
        w->job = std::move(job);
    }
    w->cv.notify_all();
}

void finish_job(Worker *w) {
    {
        std::unique_lock<std::mutex> lk(w->mu);
        w->cv.wait(lk, [w] { return !w->busy; });
    }
    {
        std::lock_guard<std::mutex> lk(g_workers->mu);
        g_workers->idle.push_back(w);
    }
    g_workers->cv.notify_all();
}

int run_launch(Launch &L, std::string &error) {
    const dim3 g = L.geom.grid, c = L.geom.cluster;
    if (L.cluster_size == 1) {
        // Blocks run one after the other, in an order that depends on the schedule, so a kernel that
        // assumes an order of blocks (the last block of a split-K tile to arrive, say) meets several:
        // linear order (round-robin, warp-greedy), reversed (warp-greedy-reversed), or a seeded
        // permutation (random: i -> (offset + i * stride) mod total with the stride coprime to total).
        const uint64_t total = (uint64_t)g.x * g.y * g.z;
        uint64_t stride = 1, offset = 0;
        if (L.desc->schedule == FK_EMU_SCHEDULE_WARP_GREEDY_REVERSED) {
            stride = total - 1;  // coprime to total: i -> (total - 1)(i + 1) = -(i + 1) mod total
            offset = total - 1;
        } else if (L.desc->schedule == FK_EMU_SCHEDULE_RANDOM && total > 1) {
            uint64_t h = (L.desc->seed | 1) * 0x9e3779b97f4a7c15ull;
            h ^= h >> 29;
            offset = h % total;
            stride = 1 + (h >> 17) % (total - 1);
            while (std::gcd(stride, total) != 1) stride = stride % (total - 1) + 1;
        }
        BlockRun b;
        for (uint64_t i = 0; i < total; ++i) {
            const uint64_t j = (offset + (unsigned __int128)i * stride % total) % total;
            const unsigned x = (unsigned)(j % g.x), y = (unsigned)((j / g.x) % g.y), z = (unsigned)(j / ((uint64_t)g.x * g.y));
            if (!run_block(L, b, uint3{x, y, z}, 0, uint3{0, 0, 0}, nullptr)) {
                add_stats(L.stats, b.stats);
                error = b.error;
                return 1;
            }
        }
        add_stats(L.stats, b.stats);
        return 0;
    }
    // Clusters: rank r of every cluster runs on OS thread r (the calling thread is rank 0).
    const unsigned C = L.cluster_size;
    const unsigned ncx = g.x / c.x, ncy = g.y / c.y, ncz = g.z / c.z;
    const uint64_t nclusters = (uint64_t)ncx * ncy * ncz;
    ClusterRun cluster;
    ThreadBarrier start(C), finish(C);
    std::vector<std::string> errors(C);
    std::vector<fk_emu_launch_stats> stats(C);
    std::vector<char> stop(1, 0);
    auto worker = [&](unsigned r) {
        BlockRun b;
        const uint3 cidx{r % c.x, (r / c.x) % c.y, r / (c.x * c.y)};
        for (uint64_t k = 0; k < nclusters; ++k) {
            if (r == 0) cluster.reset(C);
            start.wait();
            if (__atomic_load_n(&stop[0], __ATOMIC_ACQUIRE)) break;
            const unsigned kx = (unsigned)(k % ncx), ky = (unsigned)((k / ncx) % ncy), kz = (unsigned)(k / ((uint64_t)ncx * ncy));
            const uint3 idx{kx * c.x + cidx.x, ky * c.y + cidx.y, kz * c.z + cidx.z};
            {
                std::lock_guard<std::mutex> lk(cluster.mu);
                cluster.tls_base[r] = thread_tls_base();
            }
            start.wait();  // every rank's shared memory is known before any block runs
            const bool ok = run_block(L, b, idx, r, cidx, &cluster);
            if (!ok) {
                errors[r] = b.error;
                std::lock_guard<std::mutex> lk(cluster.mu);
                if (!cluster.failed) {
                    cluster.failed = true;
                    cluster.error = b.error;
                }
                cluster.exited[r] = true;
                cluster.cv.notify_all();
                __atomic_store_n(&stop[0], 1, __ATOMIC_RELEASE);
            }
            finish.wait();
            if (__atomic_load_n(&stop[0], __ATOMIC_ACQUIRE)) break;
        }
        stats[r] = b.stats;
    };
    static_assert(kMaxWorkers + 1 >= 8, "the pool must hold the helpers of the largest cluster");
    const std::vector<Worker *> helpers = borrow_workers(C - 1);
    for (unsigned r = 1; r < C; ++r) start_job(helpers[r - 1], [&worker, r] { worker(r); });
    worker(0);
    for (Worker *w : helpers) finish_job(w);
    for (unsigned r = 0; r < C; ++r) add_stats(L.stats, stats[r]);
    for (unsigned r = 0; r < C; ++r)
        if (!errors[r].empty() && errors[r].find("another block of the cluster failed") == std::string::npos) {
            error = errors[r];
            return 1;
        }
    for (unsigned r = 0; r < C; ++r)
        if (!errors[r].empty()) {
            error = errors[r];
            return 1;
        }
    return 0;
}

}  // namespace

// ---------------------------------------------------------------------------------------------------
// What kernels call.
Thread *self() { return &tls.cur->t; }

void warp_collective(Collective *c, const char *file, int line) {
    Fiber *f = tls.cur;
    f->coll = c;
    f->file = file;
    f->line = line;
    f->state = AT_COLLECTIVE;
    const bool sync = c->op == OP_SYNCWARP;
    if (sync) tsan_release(&f->run->tsan_warp[f->t.warp]);
    park(f);
    if (sync) tsan_acquire(&f->run->tsan_warp[f->t.warp]);
}

int block_barrier(int kind, int pred, const char *file, int line) {
    Fiber *f = tls.cur;
    f->bar_kind = kind;
    f->bar_pred = pred;
    f->file = file;
    f->line = line;
    f->state = AT_BARRIER;
    tsan_release(&f->run->tsan_bar);
    park(f);
    tsan_acquire(&f->run->tsan_bar);
    return f->bar_result;
}

void cluster_arrive(const char *file, int line) {
    Fiber *f = tls.cur;
    if (!f->run->cluster) {
        // A launch without clusters is a cluster of one block: the barrier is the block barrier.
        f->cluster_arrived++;
        f->file = file;
        f->line = line;
        return;
    }
    if (f->cluster_arrived != f->cluster_waited) {
        fail(*f->run, fmt("%s: barrier.cluster.arrive at %s twice without a wait", thread_name(f).c_str(),
                          where(file, line).c_str()));
        trap("", file, line);
    }
    tsan_release(&f->run->cluster->tsan_sync);
    f->cluster_arrived++;
}

void cluster_wait(const char *file, int line) {
    Fiber *f = tls.cur;
    if (!f->run->cluster) {
        f->cluster_waited++;
        block_barrier(BAR_SYNC, 0, file, line);
        return;
    }
    if (f->cluster_waited + 1 != f->cluster_arrived) {
        fail(*f->run, fmt("%s: barrier.cluster.wait at %s without a matching arrive", thread_name(f).c_str(),
                          where(file, line).c_str()));
        trap("", file, line);
    }
    f->cluster_waited++;
    f->file = file;
    f->line = line;
    f->state = AT_CLUSTER_WAIT;
    park(f);
    f->run->stats.cluster_barriers += f->t.linear == 0;
    tsan_acquire(&f->run->cluster->tsan_sync);
}

bool shared_address(const void *p) {
    // Called by kernels and by warp collectives (which run on the scheduler's side).
    const char *base = tls.block->tls_base;
    const char *q = static_cast<const char *>(p);
    const char *rt = reinterpret_cast<const char *>(&tls);
    if (q >= rt && q < rt + sizeof(Tls)) return false;
    return q >= base && q < base + module_tls().size;
}

void *map_shared_rank(const void *p, unsigned rank, const char *file, int line) {
    Fiber *f = tls.cur;
    BlockRun &b = *f->run;
    if (!shared_address(p)) {
        fail(b, fmt("%s: map_shared_rank at %s of %p, which is not in shared memory", thread_name(f).c_str(),
                    where(file, line).c_str(), p));
        trap("", file, line);
    }
    const size_t off = static_cast<const char *>(p) - b.tls_base;
    if (!b.cluster) {
        if (rank != 0) {
            fail(b, fmt("%s: map_shared_rank at %s to rank %u in a launch without clusters", thread_name(f).c_str(),
                        where(file, line).c_str(), rank));
            trap("", file, line);
        }
        return const_cast<void *>(p);
    }
    ClusterRun &c = *b.cluster;
    std::string problem;
    char *target = nullptr;
    {
        std::lock_guard<std::mutex> lk(c.mu);
        if (rank >= c.size)
            problem = fmt("map_shared_rank at %s to rank %u of a cluster of %u blocks", where(file, line).c_str(), rank,
                          c.size);
        else if (c.exited[rank])
            problem = fmt("map_shared_rank at %s to rank %u, a block that has exited (its shared memory is gone)",
                          where(file, line).c_str(), rank);
        else {
            target = c.tls_base[rank] + off;
            if (rank != b.blk.cluster_rank && (int)f->cluster_waited > c.accessed_in_phase[rank]) {
                c.accessed_in_phase[rank] = (int)f->cluster_waited;
                c.accessed_at[rank] = fmt("%s, by rank %u", where(file, line).c_str(), b.blk.cluster_rank);
            }
        }
    }
    if (!target) {
        fail(b, thread_name(f) + ": " + problem);
        trap("", file, line);
    }
    return target;
}

void trap(const char *what, const char *file, int line) {
    Fiber *f = tls.cur;
    if (what && *what) fail(*f->run, fmt("%s: %s at %s", thread_name(f).c_str(), what, where(file, line).c_str()));
    f->state = DONE;
    if (tsan()) __tsan_release(&f->tsan_park);
    switch_to_scheduler(f, true);
    __builtin_trap();
}

unsigned active_mask() {
    Fiber *f = tls.cur;
    BlockRun &b = *f->run;
    unsigned m = 0;
    for (unsigned l = 0; l < 32; ++l) {
        const unsigned i = 32 * f->t.warp + l;
        if (i < b.n && b.fibers[i]->state != DONE) m |= 1u << l;
    }
    return m;
}

void cp_async(void *dst, const void *src, unsigned cp_size, unsigned src_size, const char *file, int line) {
    Fiber *f = tls.cur;
    BlockRun &b = *f->run;
    if (cp_size != 4 && cp_size != 8 && cp_size != 16) {
        fail(b, fmt("%s: cp.async at %s of %u bytes (4, 8 or 16)", thread_name(f).c_str(), where(file, line).c_str(), cp_size));
        trap("", file, line);
    }
    if (src_size > cp_size) {
        fail(b, fmt("%s: cp.async at %s with src-size %u > cp-size %u", thread_name(f).c_str(), where(file, line).c_str(),
                    src_size, cp_size));
        trap("", file, line);
    }
    if (!shared_address(dst) || !shared_address(static_cast<char *>(dst) + cp_size - 1)) {
        fail(b, fmt("%s: cp.async at %s: destination %p is not in shared memory", thread_name(f).c_str(),
                    where(file, line).c_str(), dst));
        trap("", file, line);
    }
    if (((uintptr_t)dst | (uintptr_t)src) % cp_size) {
        fail(b, fmt("%s: cp.async at %s of %u bytes: dst %p / src %p not aligned to %u", thread_name(f).c_str(),
                    where(file, line).c_str(), cp_size, dst, src, cp_size));
        trap("", file, line);
    }
    CpCopy c;
    c.dst = static_cast<unsigned char *>(dst);
    c.size = cp_size;
    memset(c.data, 0, sizeof c.data);
    if (src_size) memcpy(c.data, src, src_size);  // the source is read now (sanitizers see the read here)
    f->cp_pending.push_back(c);
}

void cp_async_commit() {
    Fiber *f = tls.cur;
    f->cp_group_end.push_back(f->cp_pending.size());
}

void cp_async_wait(unsigned allowed) {
    Fiber *f = tls.cur;
    if (f->cp_group_end.size() <= allowed) return;
    const size_t complete = f->cp_group_end.size() - allowed;
    const size_t upto = f->cp_group_end[complete - 1];
    f->cp_group_end.erase(f->cp_group_end.begin(), f->cp_group_end.begin() + (ptrdiff_t)complete);
    land_cp_async(f, upto);
}

const char *op_name(int op) {
    switch (op) {
    case OP_SHFL_IDX: return "__shfl_sync";
    case OP_SHFL_UP: return "__shfl_up_sync";
    case OP_SHFL_DOWN: return "__shfl_down_sync";
    case OP_SHFL_XOR: return "__shfl_xor_sync";
    case OP_BALLOT: return "__ballot_sync";
    case OP_ANY: return "__any_sync";
    case OP_ALL: return "__all_sync";
    case OP_UNI: return "__uni_sync";
    case OP_MATCH_ANY: return "__match_any_sync";
    case OP_MATCH_ALL: return "__match_all_sync";
    case OP_REDUCE_ADD: return "__reduce_add_sync";
    case OP_REDUCE_MIN:
    case OP_REDUCE_UMIN: return "__reduce_min_sync";
    case OP_REDUCE_MAX:
    case OP_REDUCE_UMAX: return "__reduce_max_sync";
    case OP_REDUCE_AND: return "__reduce_and_sync";
    case OP_REDUCE_OR: return "__reduce_or_sync";
    case OP_REDUCE_XOR: return "__reduce_xor_sync";
    case OP_SYNCWARP: return "__syncwarp";
    default: return tc_op_name(op);
    }
}

void shfl_exec(Collective *const *lanes, unsigned mask, char *err, size_t err_len) {
    int width = -1;
    for (unsigned l = 0; l < 32; ++l) {
        if (!lanes[l]) continue;
        const ShflIn *in = static_cast<const ShflIn *>(lanes[l]->in);
        if (width < 0) width = in->width;
        if (in->width != width || width < 1 || width > 32 || (width & (width - 1))) {
            snprintf(err, err_len, "width %d (lane %u) is not the same power of two in [1, 32] on every lane", in->width, l);
            return;
        }
        const unsigned seg = l & ~(unsigned)(width - 1);
        int src = -1;  // -1: the lane's own value, by definition
        switch (lanes[l]->op) {
        case OP_SHFL_IDX: src = (int)(seg + ((unsigned)in->arg & (unsigned)(width - 1))); break;
        case OP_SHFL_UP: src = (int)(l - seg) - in->arg >= 0 ? (int)l - in->arg : -1; break;
        case OP_SHFL_DOWN: src = (int)(l - seg) + in->arg < width ? (int)l + in->arg : -1; break;
        case OP_SHFL_XOR: {
            const unsigned j = l ^ ((unsigned)in->arg & 31u);
            src = j < seg + (unsigned)width ? (int)j : -1;
            break;
        }
        }
        if (src >= 0 && !((mask >> src) & 1u)) {
            snprintf(err, err_len, "lane %u reads lane %d, which is outside the mask (undefined value)", l, src);
            return;
        }
        const uint64_t v = src >= 0 ? static_cast<const ShflIn *>(lanes[src]->in)->v : in->v;
        *static_cast<uint64_t *>(lanes[l]->out) = v;
    }
}

void vote_exec(Collective *const *lanes, unsigned mask, char *err, size_t err_len) {
    (void)err;
    (void)err_len;
    unsigned first = 0;
    while (!lanes[first]) ++first;
    const int op = lanes[first]->op;
    auto in = [&](unsigned l) { return *static_cast<const uint64_t *>(lanes[l]->in); };
    uint64_t all = 0;
    switch (op) {
    case OP_BALLOT:
    case OP_ANY:
    case OP_ALL:
    case OP_UNI: {
        uint32_t ballot = 0;
        for (unsigned l = 0; l < 32; ++l)
            if (lanes[l] && in(l)) ballot |= 1u << l;
        all = op == OP_BALLOT ? ballot
              : op == OP_ANY  ? ballot != 0
              : op == OP_ALL  ? ballot == mask
                              : (ballot == 0 || ballot == mask);
        break;
    }
    case OP_MATCH_ALL: {
        bool same = true;
        for (unsigned l = 0; l < 32; ++l)
            if (lanes[l] && in(l) != in(first)) same = false;
        all = same ? mask : 0;
        break;
    }
    case OP_REDUCE_ADD:
    case OP_REDUCE_MIN:
    case OP_REDUCE_MAX:
    case OP_REDUCE_UMIN:
    case OP_REDUCE_UMAX:
    case OP_REDUCE_AND:
    case OP_REDUCE_OR:
    case OP_REDUCE_XOR: {
        uint32_t acc = (uint32_t)in(first);
        for (unsigned l = first + 1; l < 32; ++l) {
            if (!lanes[l]) continue;
            const uint32_t v = (uint32_t)in(l);
            switch (op) {
            case OP_REDUCE_ADD: acc += v; break;
            case OP_REDUCE_MIN: acc = (int32_t)v < (int32_t)acc ? v : acc; break;
            case OP_REDUCE_MAX: acc = (int32_t)v > (int32_t)acc ? v : acc; break;
            case OP_REDUCE_UMIN: acc = std::min(acc, v); break;
            case OP_REDUCE_UMAX: acc = std::max(acc, v); break;
            case OP_REDUCE_AND: acc &= v; break;
            case OP_REDUCE_OR: acc |= v; break;
            default: acc ^= v; break;
            }
        }
        all = acc;
        break;
    }
    default: break;
    }
    for (unsigned l = 0; l < 32; ++l) {
        if (!lanes[l]) continue;
        uint64_t r = all;
        if (op == OP_MATCH_ANY) {
            uint32_t m = 0;
            for (unsigned k = 0; k < 32; ++k)
                if (lanes[k] && in(k) == in(l)) m |= 1u << k;
            r = m;
        }
        *static_cast<uint64_t *>(lanes[l]->out) = r;
    }
}

}  // namespace fk_emu

long long clock64() {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000ll + ts.tv_nsec;
}

// ---------------------------------------------------------------------------------------------------
// The library's C interface (fk_emu_abi.h).
using namespace fk_emu;

extern "C" __attribute__((visibility("default"))) const fk_emu_library_info *fk_emu_library(void) {
    static fk_emu_library_info info;
    const ModuleTls &m = module_tls();
    info.abi_version = FK_EMU_ABI_VERSION;
    info.sanitizer = FK_EMU_SANITIZER;
    info.arch = FK_EMU_ARCH;
    info.n_kernels = (uint32_t)fk_emu_table_size();
    info.max_dynamic_smem = FK_EMU_MAX_DYN_SMEM;
    info.static_smem = m.size > FK_EMU_MAX_DYN_SMEM + sizeof(Tls) ? m.size - FK_EMU_MAX_DYN_SMEM - sizeof(Tls) : 0;
    return &info;
}

extern "C" __attribute__((visibility("default"))) const fk_emu_kernel_info *fk_emu_kernels(void) {
    static std::vector<fk_emu_kernel_info> infos;
    static std::once_flag once;
    std::call_once(once, [] {
        for (size_t i = 0; i < fk_emu_table_size(); ++i) infos.push_back(fk_emu_table_at(i).info);
    });
    return infos.data();
}

extern "C" __attribute__((visibility("default"))) int fk_emu_launch(const fk_emu_launch_desc *d, fk_emu_launch_stats *stats,
                                                                   char *err, uint64_t err_len) {
    auto bad = [&](const std::string &m) {
        if (err && err_len) snprintf(err, err_len, "%s", m.c_str());
        return 1;
    };
    if (!module_tls().ok) return bad("the emulator cannot locate its thread-local storage (shared memory)");
    if (d->kernel >= fk_emu_table_size()) return bad(fmt("kernel index %u out of range", d->kernel));
    const KernelEntry &k = fk_emu_table_at(d->kernel);
    const char *name = k.info.name;
    if (d->n_args != k.info.n_args) return bad(fmt("%s takes %u arguments, the launch passes %u", name, k.info.n_args, d->n_args));
    for (unsigned i = 0; i < d->n_args; ++i)
        if (d->arg_size[i] != k.info.arg_size[i])
            return bad(fmt("%s: argument %u is %u bytes, the kernel takes %u", name, i, d->arg_size[i], k.info.arg_size[i]));
    for (int i = 0; i < 3; ++i) {
        if (d->grid[i] == 0 || d->block[i] == 0) return bad(fmt("%s: an empty grid or block dimension", name));
    }
    if (d->grid[0] > 2147483647u || d->grid[1] > 65535u || d->grid[2] > 65535u)
        return bad(fmt("%s: grid (%u, %u, %u) exceeds the device's limits", name, d->grid[0], d->grid[1], d->grid[2]));
    if (d->block[0] > 1024u || d->block[1] > 1024u || d->block[2] > 64u)
        return bad(fmt("%s: block (%u, %u, %u) exceeds the device's limits", name, d->block[0], d->block[1], d->block[2]));
    const uint64_t threads = (uint64_t)d->block[0] * d->block[1] * d->block[2];
    if (threads > d->max_threads_per_block)
        return bad(fmt("%s: %llu threads per block, the device allows %u", name, (unsigned long long)threads,
                       d->max_threads_per_block));
    if (k.info.max_threads && threads > k.info.max_threads)
        return bad(fmt("%s: %llu threads per block exceed its __launch_bounds__(%u) (CUDA_ERROR_INVALID_VALUE on a GPU)",
                       name, (unsigned long long)threads, k.info.max_threads));
    if (d->dynamic_smem > d->dynamic_smem_limit)
        return bad(fmt("%s: %llu bytes of dynamic shared memory exceed the kernel's limit of %llu (raise "
                       "MAX_DYNAMIC_SHARED_SIZE_BYTES first)",
                       name, (unsigned long long)d->dynamic_smem, (unsigned long long)d->dynamic_smem_limit));
    if (d->dynamic_smem_limit > d->device_smem_optin)
        return bad(fmt("%s: a dynamic shared-memory limit of %llu bytes exceeds the device's opt-in maximum of %llu", name,
                       (unsigned long long)d->dynamic_smem_limit, (unsigned long long)d->device_smem_optin));
    if (d->dynamic_smem > FK_EMU_MAX_DYN_SMEM)
        return bad(fmt("%s: %llu bytes of dynamic shared memory; the emulator holds at most %u", name,
                       (unsigned long long)d->dynamic_smem, FK_EMU_MAX_DYN_SMEM));
    unsigned cl[3];
    const bool launch_cluster = d->cluster[0] | d->cluster[1] | d->cluster[2];
    const bool kernel_cluster = k.info.cluster[0] | k.info.cluster[1] | k.info.cluster[2];
    for (int i = 0; i < 3; ++i) {
        cl[i] = kernel_cluster ? std::max(1u, k.info.cluster[i]) : launch_cluster ? std::max(1u, d->cluster[i]) : 1u;
        if (kernel_cluster && launch_cluster && std::max(1u, d->cluster[i]) != cl[i])
            return bad(fmt("%s: launched with cluster dims (%u, %u, %u), compiled with __cluster_dims__(%u, %u, %u)", name,
                           d->cluster[0], d->cluster[1], d->cluster[2], k.info.cluster[0], k.info.cluster[1],
                           k.info.cluster[2]));
        if (d->grid[i] % cl[i])
            return bad(fmt("%s: grid dimension %d (%u) is not a multiple of the cluster dimension (%u)", name, i, d->grid[i], cl[i]));
    }
    const unsigned csize = cl[0] * cl[1] * cl[2];
    if (csize > 1 && !d->cluster_capable)
        return bad(fmt("%s: thread-block clusters need compute capability 9.0 or newer", name));
    if (csize > 8) return bad(fmt("%s: a cluster of %u blocks exceeds the portable maximum of 8", name, csize));

    Launch L;
    L.kernel = &k;
    L.desc = d;
    L.geom.grid = dim3(d->grid[0], d->grid[1], d->grid[2]);
    L.geom.block = dim3(d->block[0], d->block[1], d->block[2]);
    L.geom.cluster = dim3(cl[0], cl[1], cl[2]);
    L.threads = (unsigned)threads;
    L.cluster_size = csize;
    memset(&L.stats, 0, sizeof L.stats);
    std::string error;
    const int rc = run_launch(L, error);
    if (stats) *stats = L.stats;
    if (rc) return bad(error);
    return 0;
}
