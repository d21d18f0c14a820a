//! The simulated network: per-message delay, loss, duplication, reordering (by random
//! delays) and partitions, all of which stop at the global stabilization time (GST).
//! After GST every message between live replicas arrives within `post_gst_max_delay`.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use bulwark_consensus::Time;

/// One partition: while active, replicas on different sides cannot talk.
#[derive(Clone, Debug)]
pub struct Partition {
    pub start: Time,
    pub end: Time,
    /// Side of each replica (by position).
    pub side: Vec<bool>,
}

#[derive(Clone, Debug)]
pub struct NetworkModel {
    pub gst: Time,
    pub pre_gst_max_delay: u64,
    pub post_gst_max_delay: u64,
    pub drop_rate: f64,
    pub duplicate_rate: f64,
    pub partitions: Vec<Partition>,
}

impl NetworkModel {
    /// When copies of a message sent `now` from `from` to `to` arrive (none if lost).
    pub fn deliveries(&self, rng: &mut ChaCha8Rng, now: Time, from: usize, to: usize) -> Vec<Time> {
        if now >= self.gst {
            return vec![now.plus_millis(rng.gen_range(1..=self.post_gst_max_delay))];
        }
        let cut = self
            .partitions
            .iter()
            .any(|p| p.start <= now && now < p.end && p.side.get(from) != p.side.get(to));
        if cut || rng.gen_bool(self.drop_rate) {
            return Vec::new();
        }
        let mut out = vec![now.plus_millis(rng.gen_range(1..=self.pre_gst_max_delay))];
        if rng.gen_bool(self.duplicate_rate) {
            out.push(now.plus_millis(rng.gen_range(1..=self.pre_gst_max_delay)));
        }
        out
    }
}
