//! Argument checks shared by every family's safe layer.

use std::sync::Arc;

use cudarc::driver::DeviceSlice;

use crate::error::{Error, Result};
use crate::{Backend, DeviceRead, Gpu};

/// `Err(Layout)` unless `s` lives in the handle's CUDA context.
pub(crate) fn same_context<T, S: DeviceSlice<T> + ?Sized>(
    gpu: &Gpu,
    arg: &'static str,
    s: &S,
) -> Result<()> {
    if Arc::ptr_eq(s.stream().context(), gpu.context()) {
        Ok(())
    } else {
        Err(Error::layout(
            arg,
            "belongs to another CUDA context than the Gpu handle",
        ))
    }
}

/// `Err(Layout)` unless `s` belongs to `dev` (its CUDA context; every buffer belongs to an emulator).
pub(crate) fn owned<T, B: Backend, S: DeviceRead<T, B> + ?Sized>(
    dev: &B,
    arg: &'static str,
    s: &S,
) -> Result<()> {
    s.check_owner(dev, arg)
}

/// `Err(Shape)` unless `have >= need`.
pub(crate) fn at_least(arg: &'static str, have: usize, need: usize, what: &str) -> Result<()> {
    if have < need {
        return Err(Error::shape(
            arg,
            format!("at least {need} elements ({what})"),
            format!("{have} elements"),
        ));
    }
    Ok(())
}

/// `Err(Shape)` unless `have == need`.
pub(crate) fn exactly(arg: &'static str, have: usize, need: usize, what: &str) -> Result<()> {
    if have != need {
        return Err(Error::shape(
            arg,
            format!("{need} elements ({what})"),
            format!("{have}"),
        ));
    }
    Ok(())
}
