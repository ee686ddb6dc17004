// cooperative_groups.h for the SIMT emulator: the thread block and the thread-block cluster.
//
// A cluster's blocks run together, one OS thread each, each with its own shared memory;
// cluster.sync() is a barrier over every non-exited thread of the cluster, and map_shared_rank(p, r)
// is p's offset in block r's shared memory (an error if p is not in shared memory or block r exited).
#pragma once

namespace cooperative_groups {

class thread_block {
  public:
    void sync(const char *f = __builtin_FILE(), int l = __builtin_LINE()) const {
        fk_emu::block_barrier(fk_emu::BAR_SYNC, 0, f, l);
    }
    unsigned thread_rank() const { return fk_emu::self()->linear; }
    unsigned size() const { return num_threads(); }
    unsigned num_threads() const {
        const dim3 b = blockDim;
        return b.x * b.y * b.z;
    }
    dim3 group_index() const { return dim3(blockIdx); }
    dim3 thread_index() const { return dim3(threadIdx); }
    dim3 dim_threads() const { return blockDim; }
    dim3 group_dim() const { return blockDim; }
};
inline thread_block this_thread_block() { return thread_block(); }

class cluster_group {
  public:
    void sync(const char *f = __builtin_FILE(), int l = __builtin_LINE()) const {
        fk_emu::cluster_arrive(f, l);
        fk_emu::cluster_wait(f, l);
    }
    void barrier_arrive(const char *f = __builtin_FILE(), int l = __builtin_LINE()) const {
        fk_emu::cluster_arrive(f, l);
    }
    void barrier_wait(const char *f = __builtin_FILE(), int l = __builtin_LINE()) const {
        fk_emu::cluster_wait(f, l);
    }
    unsigned block_rank() const { return fk_emu::self()->block->cluster_rank; }
    dim3 block_index() const { return dim3(fk_emu::self()->block->cluster_idx); }
    dim3 dim_blocks() const { return fk_emu::self()->block->geom->cluster; }
    unsigned num_blocks() const {
        const dim3 c = dim_blocks();
        return c.x * c.y * c.z;
    }
    unsigned num_threads() const {
        const dim3 b = blockDim;
        return num_blocks() * b.x * b.y * b.z;
    }
    unsigned thread_rank() const {
        const dim3 b = blockDim;
        return block_rank() * b.x * b.y * b.z + fk_emu::self()->linear;
    }
    template <class T>
    T *map_shared_rank(T *addr, unsigned rank, const char *f = __builtin_FILE(), int l = __builtin_LINE()) const {
        return static_cast<T *>(fk_emu::map_shared_rank(addr, rank, f, l));
    }
    template <class T>
    T *map_shared_rank(T &addr, unsigned rank, const char *f = __builtin_FILE(), int l = __builtin_LINE()) const {
        return static_cast<T *>(fk_emu::map_shared_rank(&addr, rank, f, l));
    }
};
inline cluster_group this_cluster() { return cluster_group(); }

}  // namespace cooperative_groups
