//! What the registry learns about each agent's health and other parts read: its state for the
//! map's Host nodes, and its clock offset for the mirror's delay. The registry task is the only
//! writer.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Clone, Default)]
pub struct Health {
    states: Arc<Mutex<BTreeMap<String, &'static str>>>,
    offsets: Arc<Mutex<BTreeMap<String, Arc<AtomicI64>>>>,
}

impl Health {
    pub fn set_state(&self, agent: &str, state: &'static str) {
        let mut states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        states.insert(agent.to_string(), state);
    }

    /// connected, degraded or lost; `None` for an agent not seen since the controller started.
    pub fn state(&self, agent: &str) -> Option<&'static str> {
        let states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        states.get(agent).copied()
    }

    /// The agent's clock minus the controller's, in ns (0 until measured); shared, so a mirror
    /// stream reads the latest estimate without asking.
    pub fn offset(&self, agent: &str) -> Arc<AtomicI64> {
        let mut offsets = self.offsets.lock().unwrap_or_else(|e| e.into_inner());
        offsets.entry(agent.to_string()).or_default().clone()
    }

    pub fn set_offset(&self, agent: &str, offset_ns: i64) {
        self.offset(agent).store(offset_ns, Ordering::Relaxed);
    }
}
