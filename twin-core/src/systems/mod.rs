//! Systems: the verbs of a simulation step. Their order is decided in one place,
//! [`crate::schedule`].

pub mod infer;
pub mod rollout;
pub mod sample;
pub mod storyboard;
pub mod uplink;
