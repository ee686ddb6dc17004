//! Pure plans of the loss family's entry points: every check on shapes, lengths, strides and
//! configuration, and the launch geometry and kernel parameters, from lengths and [`DeviceProps`] alone
//! (see [`crate::plan`]). The entry points check their buffers' devices, build a plan from the buffers'
//! lengths, and launch it.

use super::launch::{cluster_slice, row_grid, row_threads};
use super::sigmoid::SIGMOID_FOCAL_MAX_BLOCKS;
use super::{LabelSmoothing, LossConfig, LossElement, Reduction, RowPath, Rows, TargetIndex};
use crate::error::{Error, Result};
use crate::params::*;
use crate::plan::{extent, fits_i64, mul, mul3, PlannedLaunch};
use crate::validate::{at_least, exactly};
use crate::DeviceProps;

/// The gradient buffer of a fused call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GradBuffer {
    /// Forward only: no gradient.
    None,
    /// A separate buffer of this many elements, laid out with `Rows::grad_stride`.
    Separate(usize),
    /// Written over the logits (`grad_stride` is taken equal to `row_stride`).
    InPlace,
}

/// What one fused call passes, by length: the input of [`FusedPlan::new`]. Every field is what the
/// entry points read off their buffers; callers holding other tensor types fill it from theirs.
///
/// ```
/// use fusekit::loss::{FusedArgs, GradBuffer};
/// let args = FusedArgs::new(4 * 10, GradBuffer::Separate(4 * 10), 4, 4);
/// assert_eq!(args.class_weights, None);
/// ```
#[derive(Clone, Copy, Debug)]
pub struct FusedArgs<'a> {
    /// Elements of the logits buffer.
    pub logits: usize,
    /// The gradient buffer.
    pub grad: GradBuffer,
    /// Elements of the targets buffer.
    pub targets: usize,
    /// Elements of the class-weight buffer, if one is passed.
    pub class_weights: Option<usize>,
    /// The host copy of the class weights (needed with label smoothing).
    pub class_weights_host: Option<&'a [f32]>,
    /// Elements of the upstream-gradient buffer, if one is passed.
    pub grad_output: Option<usize>,
    /// The requested row path.
    pub row_path: RowPath,
    /// Rows the [`LossOutputs`](super::LossOutputs) hold.
    pub out_rows: usize,
}

impl FusedArgs<'static> {
    /// Buffers of these lengths, with no class weights, no upstream gradient and [`RowPath::Auto`].
    ///
    /// ```
    /// let args = fusekit::loss::FusedArgs::new(6, fusekit::loss::GradBuffer::None, 2, 2);
    /// assert_eq!(args.out_rows, 2);
    /// ```
    pub fn new(logits: usize, grad: GradBuffer, targets: usize, out_rows: usize) -> Self {
        FusedArgs {
            logits,
            grad,
            targets,
            class_weights: None,
            class_weights_host: None,
            grad_output: None,
            row_path: RowPath::Auto,
            out_rows,
        }
    }
}

impl Rows {
    /// Elements a buffer needs for `n_rows` rows at `stride`, checked.
    pub(crate) fn extent_of(&self, arg: &'static str, stride: usize) -> Result<usize> {
        extent(arg, self.n_rows, stride, self.vocab)
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if self.n_rows == 0 {
            return Err(Error::shape(
                "logits",
                "at least one row",
                "an empty batch (0 rows)",
            ));
        }
        if self.vocab == 0 {
            return Err(Error::shape("logits", "vocab >= 1", "vocab 0"));
        }
        if self.vocab > i32::MAX as usize {
            return Err(Error::shape(
                "logits",
                "vocab < 2^31",
                format!("vocab {}", self.vocab),
            ));
        }
        if self.row_stride < self.vocab {
            return Err(Error::layout(
                "logits",
                format!(
                    "row_stride {} is smaller than vocab {}",
                    self.row_stride, self.vocab
                ),
            ));
        }
        if self.grad_stride < self.vocab {
            return Err(Error::layout(
                "grad",
                format!(
                    "grad_stride {} is smaller than vocab {}",
                    self.grad_stride, self.vocab
                ),
            ));
        }
        fits_i64("logits", self.n_rows)?;
        fits_i64("row_stride", self.row_stride)?;
        fits_i64("grad_stride", self.grad_stride)?;
        Ok(())
    }
}

/// Checks shared by every call that reads targets, class weights and an upstream gradient and writes
/// [`LossOutputs`](super::LossOutputs) (`args.logits` and `args.grad` are not looked at); returns the
/// kernel's loss configuration for a vocabulary of `vocab` classes.
pub(crate) fn common(
    n_rows: usize,
    vocab: usize,
    args: &FusedArgs<'_>,
    cfg: &LossConfig,
    check_out: bool,
) -> Result<fk_loss_config> {
    if args.targets != n_rows {
        return Err(Error::shape(
            "targets",
            format!("{n_rows} elements (one per row)"),
            format!("{}", args.targets),
        ));
    }
    if check_out && args.out_rows < n_rows {
        return Err(Error::shape(
            "out",
            format!("LossOutputs for >= {n_rows} rows"),
            format!("{} rows", args.out_rows),
        ));
    }
    if let Some(w) = args.class_weights {
        exactly("class_weights", w, vocab, "vocab")?;
    }
    let smoothing = cfg.label_smoothing != LabelSmoothing::None;
    let host_w = match (args.class_weights, args.class_weights_host, smoothing) {
        (Some(_), None, true) => return Err(Error::invalid(
            "class_weights_host",
            "label smoothing with class weights needs the host copy of the weights (for sum_j w_j)",
        )),
        (Some(_), Some(h), _) => {
            exactly("class_weights_host", h.len(), vocab, "vocab")?;
            Some(h)
        }
        _ => None,
    };
    if let Some(g) = args.grad_output {
        let need = if cfg.reduction == Reduction::None {
            n_rows
        } else {
            1
        };
        if g != need {
            return Err(Error::shape(
                "grad_output",
                format!("{need} elements for {:?} reduction", cfg.reduction),
                format!("{g}"),
            ));
        }
    }
    cfg.to_params(vocab, host_w, args.class_weights.is_some())
}

/// The validated plan of one fused loss call ([`fwd_bwd`](super::fwd_bwd),
/// [`fwd_bwd_inplace`](super::fwd_bwd_inplace), [`forward`](super::forward)): the row path, the
/// launches and the kernel's parameters, computed without a device.
///
/// ```
/// use fusekit::loss::{FusedArgs, FusedPlan, GradBuffer, LossConfig, RowPath, Rows};
/// let h100 = fusekit::DeviceProps::example_h100();
/// let rows = Rows::contiguous(8, 128256);
/// let n = 8 * 128256;
/// let plan = FusedPlan::new::<half::bf16, i64>(&h100, rows, &FusedArgs::new(n, GradBuffer::Separate(n), 8, 8), &LossConfig::default())?;
/// assert_eq!(plan.row_path(), RowPath::Cluster { ctas: 4 });
/// // A gradient buffer one element short is caught before any device is involved.
/// let short = FusedArgs::new(n, GradBuffer::Separate(n - 1), 8, 8);
/// assert!(matches!(
///     FusedPlan::new::<half::bf16, i64>(&h100, rows, &short, &LossConfig::default()),
///     Err(fusekit::Error::Shape { arg: "grad", .. })
/// ));
/// # Ok::<(), fusekit::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct FusedPlan {
    pub(crate) rows: Rows,
    elem_size: usize,
    /// Kernel-name suffixes of the logits and the targets type.
    elem: &'static str,
    index: &'static str,
    pub(crate) reduction: Reduction,
    pub(crate) ignore_index: i64,
    pub(crate) params: fk_loss_config,
    requested: RowPath,
    path: RowPath,
}

impl FusedPlan {
    /// Validates a fused call with logits of type `T` and targets of type `I` on `props`' GPU.
    pub fn new<T: LossElement, I: TargetIndex>(
        props: &DeviceProps,
        rows: Rows,
        args: &FusedArgs<'_>,
        cfg: &LossConfig,
    ) -> Result<Self> {
        let rows = match args.grad {
            GradBuffer::InPlace => Rows {
                grad_stride: rows.row_stride,
                ..rows
            },
            _ => rows,
        };
        rows.validate()?;
        at_least(
            "logits",
            args.logits,
            rows.extent_of("logits", rows.row_stride)?,
            "(n_rows - 1) * row_stride + vocab",
        )?;
        if let GradBuffer::Separate(g) = args.grad {
            at_least(
                "grad",
                g,
                rows.extent_of("grad", rows.grad_stride)?,
                "(n_rows - 1) * grad_stride + vocab",
            )?;
        }
        let params = common(rows.n_rows, rows.vocab, args, cfg, true)?;
        Self::assemble::<T, I>(
            props,
            rows,
            params,
            cfg,
            args.row_path,
            args.grad != GradBuffer::None,
        )
    }

    /// The plan of validated rows and parameters: resolves the row path.
    pub(crate) fn assemble<T: LossElement, I: TargetIndex>(
        props: &DeviceProps,
        rows: Rows,
        params: fk_loss_config,
        cfg: &LossConfig,
        row_path: RowPath,
        with_grad: bool,
    ) -> Result<Self> {
        let size = std::mem::size_of::<T>();
        let path = row_path.resolve(props, rows.vocab, size, with_grad)?;
        Ok(FusedPlan {
            rows,
            elem_size: size,
            elem: T::SUFFIX,
            index: I::SUFFIX,
            reduction: cfg.reduction,
            ignore_index: cfg.ignore_index,
            params,
            requested: row_path,
            path,
        })
    }

    /// The row path the fused kernel takes (never `Auto`). On a GPU an `Auto` cluster the driver cannot
    /// place (a MIG slice) falls back to [`RowPath::Reread`] at launch.
    pub fn row_path(&self) -> RowPath {
        self.path
    }

    /// The launches of the call, in order: the mean denominator (mean reduction), the fused row
    /// kernel, the reduction of the per-row losses (mean/sum).
    ///
    /// ```
    /// use fusekit::loss::{FusedArgs, FusedPlan, GradBuffer, LossConfig, Rows};
    /// let h100 = fusekit::DeviceProps::example_h100();
    /// let plan = FusedPlan::new::<f32, i32>(&h100, Rows::contiguous(2, 3), &FusedArgs::new(6, GradBuffer::Separate(6), 2, 2), &LossConfig::default())?;
    /// let names: Vec<_> = plan.launches().into_iter().map(|l| l.kernel).collect();
    /// assert_eq!(names, ["fk_loss_denominator_i32", "fk_ce_fwd_bwd_f32_i32", "fk_loss_reduce"]);
    /// # Ok::<(), fusekit::Error>(())
    /// ```
    pub fn launches(&self) -> Vec<PlannedLaunch> {
        let reduce = crate::launch::grid(1, FK_LOSS_REDUCE_THREADS);
        let index = self.index;
        let mut v = Vec::with_capacity(3);
        if self.reduction == Reduction::Mean {
            v.push(PlannedLaunch::new(
                format!("fk_loss_denominator_{index}"),
                reduce,
            ));
        }
        v.push(self.row_kernel());
        if self.reduction != Reduction::None {
            v.push(PlannedLaunch::new("fk_loss_reduce".into(), reduce));
        }
        v
    }

    /// Whether the configuration needs the general row kernels (`fk_ce_fwd_bwd_gen_*`): a softcap or
    /// label smoothing of cross-entropy puts work on every element. Every other configuration (any
    /// loss kind, z-loss, class weights) takes the plain kernels, whose loops carry none of it.
    pub(crate) fn general(&self) -> bool {
        self.params.softcap > 0.0
            || (self.params.kind == crate::params::FK_LOSS_CE && self.params.smoothing != 0.0)
    }

    /// The fused row kernel's launch for the plan's path.
    pub(crate) fn row_kernel(&self) -> PlannedLaunch {
        let size = self.elem_size;
        let variant = if self.general() { "gen_" } else { "" };
        match self.path {
            RowPath::Cluster { ctas } => {
                let slice = cluster_slice(self.rows.vocab, ctas);
                // One cluster per row, up to 2^20 clusters (grid-stride over rows beyond).
                let clusters = self.rows.n_rows.min(1 << 20);
                PlannedLaunch {
                    kernel: format!(
                        "fk_ce_fwd_bwd_{variant}cluster{ctas}_{}_{}",
                        self.elem, self.index
                    ),
                    grid: (clusters * ctas as usize) as u32,
                    block: row_threads(slice, size),
                    shared_mem_bytes: (slice * size + 16) as u32,
                }
            }
            path => PlannedLaunch {
                kernel: format!("fk_ce_fwd_bwd_{variant}{}_{}", self.elem, self.index),
                grid: row_grid(self.rows.n_rows),
                block: row_threads(self.rows.vocab, size),
                shared_mem_bytes: if path == RowPath::SharedMemory {
                    (self.rows.vocab * size + 16) as u32
                } else {
                    0
                },
            },
        }
    }

    /// Whether the row path was an `Auto` choice of a cluster (which may fall back at launch).
    pub(crate) fn auto_cluster(&self) -> bool {
        self.requested == RowPath::Auto && matches!(self.path, RowPath::Cluster { .. })
    }

    /// The same plan taking the re-read path (the fallback of an `Auto` cluster that does not fit).
    pub(crate) fn rerouted(&self) -> Self {
        FusedPlan {
            path: RowPath::Reread,
            ..self.clone()
        }
    }

    /// The plan of `c` contiguous rows of the same call (a chunk of fused linear + CE).
    pub(crate) fn chunk(&self, c: usize) -> Self {
        FusedPlan {
            rows: Rows::contiguous(c, self.rows.vocab),
            ..self.clone()
        }
    }

    /// `(kernel, cluster size)` of the row kernel, for the driver's cluster-fit query.
    pub(crate) fn cluster_query(&self) -> Option<(String, u32, u32)> {
        let l = self.row_kernel();
        matches!(self.path, RowPath::Cluster { .. }).then_some((
            l.kernel,
            l.block,
            l.shared_mem_bytes,
        ))
    }
}

/// The validated plan of [`sigmoid_focal_fwd_bwd`](super::sigmoid_focal_fwd_bwd) over `n` elements.
///
/// ```
/// use fusekit::loss::{SigmoidFocalConfig, SigmoidFocalPlan};
/// let plan = SigmoidFocalPlan::new::<half::bf16>(1 << 20, 1 << 20, 1 << 20, None, &SigmoidFocalConfig::default(), 1 << 20, false)?;
/// assert_eq!(plan.launches()[0].kernel, "fk_sigmoid_focal_g2_bf16"); // gamma = 2: its own kernel
/// # Ok::<(), fusekit::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct SigmoidFocalPlan {
    pub(crate) n: usize,
    pub(crate) blocks: usize,
    kernel: String,
    pub(crate) cfg: super::SigmoidFocalConfig,
}

impl SigmoidFocalPlan {
    /// Validates a call with `logits`, `targets` and `grad` elements of type `T`, an upstream gradient of
    /// `grad_output` elements, and outputs made for `out_n` elements (`out_per_element`: with the
    /// per-element loss buffer).
    pub fn new<T: LossElement>(
        logits: usize,
        targets: usize,
        grad: usize,
        grad_output: Option<usize>,
        cfg: &super::SigmoidFocalConfig,
        out_n: usize,
        out_per_element: bool,
    ) -> Result<Self> {
        let n = logits;
        if n == 0 {
            return Err(Error::shape(
                "logits",
                "at least one element",
                "an empty tensor",
            ));
        }
        fits_i64("logits", n)?;
        exactly("targets", targets, n, "as logits")?;
        exactly("grad", grad, n, "as logits")?;
        if out_n != n {
            return Err(Error::shape(
                "out",
                format!("SigmoidFocalOutputs for {n} elements"),
                format!("{out_n}"),
            ));
        }
        if cfg.reduction == Reduction::None && !out_per_element {
            return Err(Error::shape(
                "out.elements",
                format!("{n} elements for Reduction::None"),
                "none allocated".to_string(),
            ));
        }
        if !(cfg.gamma.is_finite() && cfg.gamma >= 0.0) {
            return Err(Error::invalid(
                "gamma",
                format!("must be finite and >= 0, got {}", cfg.gamma),
            ));
        }
        if !(cfg.alpha.is_finite() && cfg.alpha <= 1.0) {
            return Err(Error::invalid(
                "alpha",
                format!("must be <= 1 (negative disables it), got {}", cfg.alpha),
            ));
        }
        if let Some(g) = grad_output {
            let need = if cfg.reduction == Reduction::None {
                n
            } else {
                1
            };
            exactly("grad_output", g, need, "per the reduction")?;
        }
        let per_vec = 16 / std::mem::size_of::<T>();
        let blocks = n
            .div_ceil(FK_SIGMOID_FOCAL_THREADS as usize * per_vec * 4)
            .clamp(1, SIGMOID_FOCAL_MAX_BLOCKS);
        Ok(SigmoidFocalPlan {
            n,
            blocks,
            // gamma 0 and 2 (torchvision's default) have kernels of their own with the powers
            // written out; any other gamma takes the general one.
            kernel: format!(
                "fk_sigmoid_focal_{}{}",
                if cfg.gamma == 0.0 {
                    "g0_"
                } else if cfg.gamma == 2.0 {
                    "g2_"
                } else {
                    ""
                },
                T::SUFFIX
            ),
            cfg: *cfg,
        })
    }

    /// The launches: the element kernel, then (mean/sum) the fixed-order reduction of its block sums.
    pub fn launches(&self) -> Vec<PlannedLaunch> {
        let mut v = vec![PlannedLaunch::new(
            self.kernel.clone(),
            crate::launch::grid(self.blocks, FK_SIGMOID_FOCAL_THREADS),
        )];
        if self.cfg.reduction != Reduction::None {
            v.push(PlannedLaunch::new(
                "fk_loss_reduce".into(),
                crate::launch::grid(1, FK_LOSS_REDUCE_THREADS),
            ));
        }
        v
    }
}

/// Which vocabulary-shard call a [`ShardPlan`] is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShardStage {
    /// [`shard_stats`](super::shard_stats): `stats` is the `[N, 4]` output's length.
    Stats {
        /// Elements of the statistics output.
        stats: usize,
    },
    /// [`shard_backward`](super::shard_backward): `grad` is the gradient buffer's length.
    Backward {
        /// Elements of the gradient buffer.
        grad: usize,
    },
}

/// The validated plan of a per-shard call ([`shard_stats`](super::shard_stats),
/// [`shard_backward`](super::shard_backward)).
///
/// ```
/// use fusekit::loss::{FusedArgs, GradBuffer, LossConfig, Rows, ShardPlan, ShardSpec, ShardStage};
/// let spec = ShardSpec { vocab_offset: 64000, full_vocab: 128000 };
/// let args = FusedArgs::new(4 * 64000, GradBuffer::None, 4, 4);
/// let plan = ShardPlan::new::<half::bf16, i64>(Rows::contiguous(4, 64000), spec, &args, &LossConfig::default(), ShardStage::Stats { stats: 16 })?;
/// assert_eq!(plan.launches()[0].kernel, "fk_ce_shard_stats_bf16_i64");
/// # Ok::<(), fusekit::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct ShardPlan {
    pub(crate) rows: Rows,
    pub(crate) params: fk_loss_config,
    launch: PlannedLaunch,
}

impl ShardPlan {
    /// Validates a per-shard call: logits of type `T` (`rows.vocab` is the shard width), targets of type
    /// `I`, class weights over the full vocabulary.
    pub fn new<T: LossElement, I: TargetIndex>(
        rows: Rows,
        spec: super::ShardSpec,
        args: &FusedArgs<'_>,
        cfg: &LossConfig,
        stage: ShardStage,
    ) -> Result<Self> {
        let rows = match stage {
            ShardStage::Stats { .. } => Rows {
                grad_stride: rows.vocab,
                ..rows
            },
            ShardStage::Backward { .. } => rows,
        };
        rows.validate()?;
        spec.validate(rows.vocab)?;
        at_least(
            "logits",
            args.logits,
            rows.extent_of("logits", rows.row_stride)?,
            "the shard",
        )?;
        let params = common(rows.n_rows, spec.full_vocab, args, cfg, false)?;
        let size = std::mem::size_of::<T>();
        let name = match stage {
            ShardStage::Stats { stats } => {
                at_least(
                    "stats",
                    stats,
                    mul("stats", rows.n_rows, super::SHARD_STAT_WIDTH, "[N, 4]")?,
                    "[N, 4]",
                )?;
                "fk_ce_shard_stats"
            }
            ShardStage::Backward { grad } => {
                at_least(
                    "grad",
                    grad,
                    rows.extent_of("grad", rows.grad_stride)?,
                    "the shard gradient",
                )?;
                if args.out_rows < rows.n_rows {
                    return Err(Error::shape(
                        "out",
                        format!("LossOutputs for >= {} rows", rows.n_rows),
                        format!("{} rows", args.out_rows),
                    ));
                }
                "fk_ce_shard_bwd"
            }
        };
        Ok(ShardPlan {
            rows,
            params,
            launch: PlannedLaunch::new(
                format!("{name}_{}_{}", T::SUFFIX, I::SUFFIX),
                crate::launch::grid(
                    row_grid(rows.n_rows) as usize,
                    row_threads(rows.vocab, size),
                ),
            ),
        })
    }

    /// The one launch of a per-shard call.
    pub fn launches(&self) -> Vec<PlannedLaunch> {
        vec![self.launch.clone()]
    }
}

/// The validated plan of [`shard_combine`](super::shard_combine).
///
/// ```
/// use fusekit::loss::{FusedArgs, GradBuffer, LossConfig, ShardCombinePlan};
/// let args = FusedArgs::new(0, GradBuffer::None, 4, 4);
/// let plan = ShardCombinePlan::new::<i64>(4, 128000, 2 * 4 * 4, 2, &args, &LossConfig::default())?;
/// assert_eq!(plan.launches().len(), 3); // denominator, combine, reduce
/// # Ok::<(), fusekit::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct ShardCombinePlan {
    pub(crate) n_rows: usize,
    pub(crate) n_shards: usize,
    pub(crate) vocab: usize,
    pub(crate) params: fk_loss_config,
    reduction: Reduction,
    index: &'static str,
}

impl ShardCombinePlan {
    /// Validates a combine of `n_shards` gathered statistics (`stats` elements) for `n_rows` rows of a
    /// `full_vocab` vocabulary, targets of type `I`.
    pub fn new<I: TargetIndex>(
        n_rows: usize,
        full_vocab: usize,
        stats: usize,
        n_shards: usize,
        args: &FusedArgs<'_>,
        cfg: &LossConfig,
    ) -> Result<Self> {
        if n_shards == 0 {
            return Err(Error::invalid("n_shards", "must be >= 1"));
        }
        Rows::contiguous(n_rows, full_vocab).validate()?;
        at_least(
            "stats",
            stats,
            mul3(
                "stats",
                n_shards,
                n_rows,
                super::SHARD_STAT_WIDTH,
                "[n_shards, N, 4]",
            )?,
            "[n_shards, N, 4]",
        )?;
        let params = common(n_rows, full_vocab, args, cfg, true)?;
        Ok(ShardCombinePlan {
            n_rows,
            n_shards,
            vocab: full_vocab,
            params,
            reduction: cfg.reduction,
            index: I::SUFFIX,
        })
    }

    pub(crate) fn combine_launch(&self) -> PlannedLaunch {
        PlannedLaunch::new(
            format!("fk_ce_shard_combine_{}", self.index),
            crate::launch::grid(self.n_rows.div_ceil(256).min(65535), 256),
        )
    }

    /// The launches: the mean denominator (mean), the combine, the reduction (mean/sum).
    pub fn launches(&self) -> Vec<PlannedLaunch> {
        let reduce = crate::launch::grid(1, FK_LOSS_REDUCE_THREADS);
        let mut v = Vec::with_capacity(3);
        if self.reduction == Reduction::Mean {
            v.push(PlannedLaunch::new(
                format!("fk_loss_denominator_{}", self.index),
                reduce,
            ));
        }
        v.push(self.combine_launch());
        if self.reduction != Reduction::None {
            v.push(PlannedLaunch::new("fk_loss_reduce".into(), reduce));
        }
        v
    }
}
