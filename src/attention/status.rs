//! The status word every attention launch shares: zeroed before the launch, raised by the kernels to
//! `batch − b` for the first sequence `b` whose device tables disagree with the plan, read back by the
//! workspaces' `check_status_sync`.

use crate::backend::private::AddrMut;
use crate::error::{Error, Result};
use crate::Backend;

#[derive(Debug)]
pub(super) struct StatusWord<B: Backend> {
    word: B::Buffer<u64>,
    /// Sequences of the last launch armed with this word: the word counts from it.
    batch: usize,
}

impl<B: Backend> StatusWord<B> {
    pub(super) fn new(dev: &B) -> Result<Self> {
        Ok(StatusWord {
            word: dev.alloc_zeros(1)?,
            batch: 0,
        })
    }

    /// Zeroes the word for a launch over `batch` sequences; returns its device address with the guard
    /// the caller holds until the launch is queued.
    pub(super) fn arm<'a>(&'a mut self, dev: &'a B, batch: usize) -> Result<(u64, B::Guard<'a>)> {
        crate::validate::owned(dev, "ws", &self.word)?;
        dev.zero(&mut self.word)?;
        self.batch = batch;
        Ok(self.word.addr_mut(dev))
    }

    /// `Err(OutOfRange)` naming the first flagged sequence, with `allowed` saying what the tables must
    /// hold; `Ok` when none was. Synchronises the stream.
    pub(super) fn check_sync(&self, dev: &B, allowed: &str) -> Result<()> {
        let s = dev.download(&self.word)?[0];
        if s == 0 {
            return Ok(());
        }
        let b = self.batch.saturating_sub(s as usize);
        Err(Error::OutOfRange {
            arg: "page_table",
            index: b,
            value: b as i64,
            allowed: allowed.into(),
        })
    }
}
