//! Small runtime leaves with no knowledge of the gateway: coarse clocks, busy-polling, header
//! values cut from a per-thread buffer.

pub mod busy_poll;
pub mod clock;
pub mod deadline;
pub mod values;
