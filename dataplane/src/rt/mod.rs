//! Small runtime leaves with no knowledge of the gateway: coarse clocks, busy-polling, header
//! values cut from a per-thread buffer.

pub(crate) mod busy_poll;
pub(crate) mod clock;
pub(crate) mod deadline;
pub(crate) mod values;
