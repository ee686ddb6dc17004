//! The unsafe boundary of the MoE family: parameter structs, launch shapes, launches.

use cudarc::driver::LaunchConfig;

use super::{
    BalanceState, EpCountsPlan, GatePlan, HiddenElement, PermutePlan, RouterElement, Scoring,
};
use crate::backend::opt_addr;
use crate::backend::private::{Addr, AddrMut};
use crate::device::Family;
use crate::error::Result;
use crate::launch::{grid, launch_kernel};
use crate::params::*;
use crate::plan::PlannedLaunch;
use crate::{Backend, DeviceRead, DeviceWrite};

fn launch1<B: Backend>(
    dev: &B,
    name: &str,
    cfg: LaunchConfig,
    params: &impl cudarc::driver::DeviceRepr,
) -> Result<()> {
    launch_kernel(dev, Family::Moe, name, cfg, params, None)
}

/// Experts per lane of the gate kernel: the power of two with 32·NPL ≥ E.
pub(crate) fn experts_per_lane(e: usize) -> usize {
    e.div_ceil(32).next_power_of_two()
}

#[allow(clippy::too_many_arguments)]
pub(super) fn gate<B, T, L, I, W, C>(
    dev: &B,
    plan: &GatePlan,
    logits: &L,
    bias: Option<&B::Buffer<f32>>,
    ids: &mut I,
    weights: &mut W,
    counts: &mut C,
) -> Result<()>
where
    B: Backend,
    T: RouterElement,
    L: DeviceRead<T, B>,
    I: DeviceWrite<i32, B>,
    W: DeviceWrite<f32, B>,
    C: DeviceWrite<i32, B>,
{
    let (cfg, n_tokens) = (&plan.cfg, plan.n_tokens);
    let (lp, _a) = logits.addr(dev);
    let (bp, _b) = opt_addr(bias, dev);
    let (ip, _c) = ids.addr_mut(dev);
    let (wp, _d) = weights.addr_mut(dev);
    let (cp, _e) = counts.addr_mut(dev);
    let p = fk_moe_gate_params {
        logits: lp as *const std::ffi::c_void,
        bias: bp as *const f32,
        ids: ip as *mut i32,
        weights: wp as *mut f32,
        counts: cp as *mut i32,
        n_tokens: n_tokens as i64,
        n_experts: cfg.n_experts as i32,
        top_k: cfg.top_k as i32,
        n_group: cfg.n_group as i32,
        topk_group: cfg.topk_group as i32,
        score: match cfg.scoring {
            Scoring::Sigmoid => FK_MOE_SCORE_SIGMOID,
            Scoring::Softmax => FK_MOE_SCORE_SOFTMAX,
        },
        renormalize: cfg.renormalize as u32,
        scaling: cfg.scaling,
    };
    let l = &plan.launches()[0];
    launch1(dev, &l.kernel, l.config(), &p)
}

pub(super) fn bias_update<B: Backend>(
    dev: &B,
    st: &mut BalanceState<B>,
    rate: f32,
    proportional: bool,
    reset: bool,
) -> Result<()> {
    let (cp, _a) = st.counts.addr_mut(dev);
    let (bp, _b) = st.bias.addr_mut(dev);
    let (mp, _c) = st.maxvio_batch.addr_mut(dev);
    let (wp, _d) = match st.window.as_mut() {
        Some(w) => {
            let (p, g) = w.addr_mut(dev);
            (p, Some(g))
        }
        None => (0, None),
    };
    let (wsp, _e) = st.window_sum.addr_mut(dev);
    let (pp, _f) = st.window_pos.addr_mut(dev);
    let (fp, _g) = st.window_fill.addr_mut(dev);
    let (mwp, _h) = st.maxvio_window.addr_mut(dev);
    let p = fk_moe_bias_update_params {
        counts: cp as *mut i32,
        bias: bp as *mut f32,
        maxvio_batch: mp as *mut f32,
        window: wp as *mut i32,
        window_sum: wsp as *mut i64,
        window_pos: pp as *mut i32,
        window_fill: fp as *mut i32,
        maxvio_window: mwp as *mut f32,
        n_experts: st.n_experts as i32,
        window_len: st.window_len as i32,
        rate,
        proportional: proportional as u32,
        reset_counts: reset as u32,
    };
    launch1(dev, "fk_moe_bias_update", grid(1, 1024), &p)
}

pub(super) fn plan<B: Backend, I: DeviceRead<i32, B>>(
    dev: &B,
    pl: &mut PermutePlan<B>,
    ids: &I,
    launches: &[PlannedLaunch],
) -> Result<()> {
    dev.zero(&mut pl.status)?;
    let s = pl.shape;
    let slots = s.slots();
    let chunk = FK_MOE_PLAN_CHUNK as usize;
    let n_chunks = s.n_chunks();
    let max_rows = s.max_rows();
    let (idp, _a) = ids.addr(dev);
    let (ccp, _b) = pl.chunk_counts.addr_mut(dev);
    let (op, _c) = pl.offsets.addr_mut(dev);
    let (pop, _d) = pl.padded_offsets.addr_mut(dev);
    let (bep, _e) = pl.block_expert.addr_mut(dev);
    let (ssp, _f) = pl.sorted_slots.addr_mut(dev);
    let (srp, _g) = pl.slot_row.addr_mut(dev);
    let (stp, _h) = pl.status.addr_mut(dev);
    let p = fk_moe_plan_params {
        ids: idp as *const i32,
        chunk_counts: ccp as *mut i32,
        offsets: op as *mut i32,
        padded_offsets: pop as *mut i32,
        block_expert: bep as *mut i32,
        sorted_slots: ssp as *mut i32,
        slot_row: srp as *mut i32,
        status: stp as *mut i32,
        n_slots: slots as i64,
        n_experts: s.n_experts as i32,
        chunk: chunk as i32,
        n_chunks: n_chunks as i32,
        block_size: s.block_size as i32,
        max_rows: max_rows as i64,
        max_blocks: max_rows.div_ceil(s.block_size) as i32,
    };
    for l in launches {
        launch1(dev, &l.kernel, l.config(), &p)?;
    }
    Ok(())
}

pub(super) fn gather<B: Backend, T: HiddenElement, Hs: DeviceRead<T, B>, O: DeviceWrite<T, B>>(
    dev: &B,
    pl: &PermutePlan<B>,
    l: &PlannedLaunch,
    hidden: &Hs,
    h: usize,
    out: &mut O,
) -> Result<()> {
    let (hp, _a) = hidden.addr(dev);
    let (op, _b) = out.addr_mut(dev);
    let (ssp, _c) = pl.sorted_slots.addr(dev);
    let (pop, _d) = pl.padded_offsets.addr(dev);
    let p = fk_moe_gather_params {
        hidden: hp as *const std::ffi::c_void,
        sorted_slots: ssp as *const i32,
        out: op as *mut std::ffi::c_void,
        rows: pl.max_rows() as i64,
        hidden_size: h as i64,
        top_k: pl.shape.top_k as i32,
    };
    // The total row count lives on the device (padded_offsets[E]); the kernel stops there.
    // `total` points at padded_offsets[E], inside the plan's [E + 1] buffer.
    let total = pop + 4 * pl.shape.n_experts as u64;
    launch_kernel(dev, Family::Moe, &l.kernel, l.config(), &p, Some(total))
}

pub(super) fn combine<
    B: Backend,
    T: HiddenElement,
    X: DeviceRead<T, B>,
    W: DeviceRead<f32, B>,
    O: DeviceWrite<T, B>,
>(
    dev: &B,
    pl: &PermutePlan<B>,
    l: &PlannedLaunch,
    expert_out: &X,
    weights: &W,
    h: usize,
    out: &mut O,
) -> Result<()> {
    let (xp, _a) = expert_out.addr(dev);
    let (wp, _b) = weights.addr(dev);
    let (op, _c) = out.addr_mut(dev);
    let (srp, _d) = pl.slot_row.addr(dev);
    let p = fk_moe_combine_params {
        expert_out: xp as *const std::ffi::c_void,
        weights: wp as *const f32,
        slot_row: srp as *const i32,
        out: op as *mut std::ffi::c_void,
        n_tokens: pl.shape.n_tokens as i64,
        hidden_size: h as i64,
        top_k: pl.shape.top_k as i32,
    };
    launch1(dev, &l.kernel, l.config(), &p)
}

#[allow(clippy::too_many_arguments)]
pub(super) fn ep_counts<
    B: Backend,
    I: DeviceRead<i32, B>,
    M: DeviceWrite<u8, B>,
    R: DeviceWrite<i32, B>,
>(
    dev: &B,
    plan: &EpCountsPlan,
    ids: &I,
    membership: &mut M,
    tokens_per_rank: &mut R,
) -> Result<()> {
    let (ip, _a) = ids.addr(dev);
    let (mp, _b) = membership.addr_mut(dev);
    let (tp, _c) = tokens_per_rank.addr_mut(dev);
    let p = fk_moe_ep_params {
        ids: ip as *const i32,
        membership: mp as *mut u8,
        tokens_per_rank: tp as *mut i32,
        n_tokens: plan.n_tokens as i64,
        top_k: plan.top_k as i32,
        n_ranks: plan.n_ranks as i32,
        experts_per_rank: plan.experts_per_rank() as i32,
    };
    let l = &plan.launches()[0];
    launch1(dev, &l.kernel, l.config(), &p)
}

#[cfg(test)]
mod tests {
    use crate::params::FK_MOE_PLAN_CHUNK;
    use crate::testing::Rng;

    /// The four plan kernels replayed on the host step by step (chunk histograms; per-expert scan over
    /// the chunks in 32 warp segments; scan over the experts with padding and each expert's range of blocks
    /// written directly; the warp-synchronous scatter), returning the reference's tuple plus block_expert
    /// over all max_blocks.
    #[allow(clippy::needless_range_loop)] // indices as the kernels use them
    fn plan_as_kernels(ids: &[i32], e: usize, bs: usize) -> crate::moe::reference::Plan {
        let chunk = FK_MOE_PLAN_CHUNK as usize;
        let s = ids.len();
        let nc = s.div_ceil(chunk);
        let max_rows = s + e * (bs - 1);
        let max_blocks = max_rows.div_ceil(bs);
        let valid = |id: i32| id >= 0 && (id as usize) < e;
        // fk_moe_plan_count
        let mut cc = vec![0i32; nc * e];
        for c in 0..nc {
            for &id in &ids[c * chunk..(c * chunk + chunk).min(s)] {
                if valid(id) {
                    cc[c * e + id as usize] += 1;
                }
            }
        }
        // fk_moe_plan_scan_chunks
        let mut offsets = vec![0i32; e + 1];
        let seg = nc.div_ceil(32);
        for x in 0..e {
            let mut base = [0i32; 32];
            let mut run = 0;
            for (w, b) in base.iter_mut().enumerate() {
                let (c0, c1) = ((w * seg).min(nc), ((w * seg).min(nc) + seg).min(nc));
                *b = run;
                run += (c0..c1).map(|c| cc[c * e + x]).sum::<i32>();
            }
            offsets[x] = run;
            for (w, &b) in base.iter().enumerate() {
                let (c0, c1) = ((w * seg).min(nc), ((w * seg).min(nc) + seg).min(nc));
                let mut n = b;
                for c in c0..c1 {
                    let k = cc[c * e + x];
                    cc[c * e + x] = n;
                    n += k;
                }
            }
        }
        // fk_moe_plan_scan
        let mut sorted = vec![i32::MIN; max_rows];
        let mut poff = vec![0i32; e + 1];
        let (mut total, mut ptotal) = (0, 0);
        for x in 0..e {
            let n = offsets[x];
            let padded = (n + bs as i32 - 1) / bs as i32 * bs as i32;
            offsets[x] = total;
            poff[x] = ptotal;
            for r in ptotal + n..ptotal + padded {
                sorted[r as usize] = -1;
            }
            total += n;
            ptotal += padded;
        }
        offsets[e] = total;
        poff[e] = ptotal;
        // Each expert's range of blocks written directly, then -1 for the blocks past the padded total.
        let mut block_expert = vec![i32::MIN; max_blocks];
        for x in 0..e {
            let (b0, b1) = (poff[x] as usize / bs, poff[x + 1] as usize / bs);
            for be in &mut block_expert[b0.min(max_blocks)..b1.min(max_blocks)] {
                *be = x as i32;
            }
        }
        for be in &mut block_expert[(ptotal as usize / bs).min(max_blocks)..] {
            *be = -1;
        }
        for r in ptotal as usize..max_rows {
            sorted[r] = -1;
        }
        // fk_moe_plan_scatter: one warp per chunk, groups of 32 slots ranked among equal ids.
        let mut slot_row = vec![i32::MIN; s];
        for c in 0..nc {
            let mut base: Vec<i32> = (0..e).map(|x| poff[x] + cc[c * e + x]).collect();
            let (s0, s1) = (c * chunk, (c * chunk + chunk).min(s));
            for g in (s0..s1).step_by(32) {
                let lanes: Vec<i32> = (g..g + 32)
                    .map(|m| if m < s1 { ids[m] } else { -2 })
                    .map(|id| if id != -2 && !valid(id) { -1 } else { id })
                    .collect();
                for (l, &id) in lanes.iter().enumerate() {
                    let my = g + l;
                    if id >= 0 {
                        let rank = lanes[..l].iter().filter(|&&o| o == id).count() as i32;
                        let row = base[id as usize] + rank;
                        sorted[row as usize] = my as i32;
                        slot_row[my] = row;
                    } else if my < s1 {
                        slot_row[my] = -1;
                    }
                }
                for x in 0..e {
                    base[x] += lanes.iter().filter(|&&o| o == x as i32).count() as i32;
                }
            }
        }
        (sorted, slot_row, offsets, poff, block_expert)
    }

    #[test]
    fn plan_kernels_replayed_on_the_host_equal_the_reference() {
        let seed = crate::testing::seed_for("plan_kernels_replayed_on_the_host");
        let mut rng = Rng::new(seed);
        let chunk = FK_MOE_PLAN_CHUNK as usize;
        for &(t, k, e, bs) in &[
            (1usize, 1usize, 1usize, 1usize),
            (7, 2, 3, 4),
            (100, 6, 64, 1),
            (513, 8, 256, 128),
            (4096, 8, 256, 64),
            (65536 / 8, 8, 160, 16),
            (3000, 10, 512, 7),
            (2 * chunk * 33 + 5, 1, 1024, 3),
        ] {
            // Skewed ids (a hot expert), a few invalid ones.
            let ids: Vec<i32> = (0..t * k)
                .map(|_| {
                    let u = rng.below(100);
                    if u < 2 {
                        -1
                    } else if u < 4 {
                        e as i32
                    } else if u < 40 {
                        0
                    } else {
                        rng.below(e as u64) as i32
                    }
                })
                .collect();
            let got = plan_as_kernels(&ids, e, bs);
            let (sorted, slot_row, off, poff, blocks) =
                super::super::reference::plan(&ids, e, bs).unwrap();
            let ctx = format!("seed {seed:#x} T {t} K {k} E {e} bs {bs}");
            let used = *poff.last().unwrap() as usize;
            assert_eq!(&got.0[..used], &sorted[..], "{ctx}: sorted slots");
            assert!(
                got.0[used..].iter().all(|&r| r == -1),
                "{ctx}: rows past the end"
            );
            assert_eq!(got.1, slot_row, "{ctx}: slot_row");
            assert_eq!(got.2, off, "{ctx}: offsets");
            assert_eq!(got.3, poff, "{ctx}: padded offsets");
            assert_eq!(&got.4[..blocks.len()], &blocks[..], "{ctx}: block experts");
            assert!(
                got.4[blocks.len()..].iter().all(|&b| b == -1),
                "{ctx}: blocks past the end"
            );
        }
    }
}
