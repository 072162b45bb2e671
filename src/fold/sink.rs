//! The output writers as the fold's sinks.

use super::Sink;
use crate::error::Result;
use crate::output::Writer;

impl Sink for Writer {
    fn write(&self, tensor: usize, off: u64, bytes: &[u8]) -> Result<()> {
        Writer::write(self, tensor, off, bytes)
    }

    fn write_batch(&self, writes: &[(usize, u64, &[u8])]) -> Result<()> {
        Writer::write_batch(self, writes)
    }
}
