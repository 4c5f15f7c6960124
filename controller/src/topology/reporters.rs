//! The observations backing an edge. Kept in a form sized for the common case: most edges have
//! one or two reporters, a hub thousands.

use std::collections::BTreeMap;

use super::model::{AgentId, Direction, ObsKey};

/// An observation backing an edge: the agent and its row.
pub type Reporter = (AgentId, ObsKey);

/// Up to this many reporters an edge keeps them in a sorted vector.
const FEW: usize = 8;

/// The observations backing an edge, with their socket counts, in key order. Most edges have one
/// or two (a client row and a server row) and a B-tree allocates room for eleven at its first
/// insert, 1.3 KB with these keys: a map of one row per edge cost three times more than its
/// rows. A few live in a sorted vector; a hub's thousands in a B-tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reporters {
    Few(Vec<(Reporter, u32)>),
    Many(BTreeMap<Reporter, u32>),
}

impl Default for Reporters {
    fn default() -> Self {
        Reporters::Few(Vec::new())
    }
}

impl Reporters {
    pub fn len(&self) -> usize {
        match self {
            Reporters::Few(v) => v.len(),
            Reporters::Many(m) => m.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn insert(&mut self, reporter: Reporter, sockets: u32) {
        match self {
            Reporters::Few(v) => match v.binary_search_by(|(r, _)| r.cmp(&reporter)) {
                Ok(i) => v[i].1 = sockets,
                Err(i) if v.len() < FEW => v.insert(i, (reporter, sockets)),
                Err(_) => {
                    let mut m: BTreeMap<Reporter, u32> = std::mem::take(v).into_iter().collect();
                    m.insert(reporter, sockets);
                    *self = Reporters::Many(m);
                }
            },
            Reporters::Many(m) => {
                m.insert(reporter, sockets);
            }
        }
    }

    pub fn remove(&mut self, reporter: &Reporter) {
        match self {
            Reporters::Few(v) => {
                if let Ok(i) = v.binary_search_by(|(r, _)| r.cmp(reporter)) {
                    v.remove(i);
                }
            }
            Reporters::Many(m) => {
                m.remove(reporter);
                // Back to a vector well below the switch, so an edge at the boundary does not
                // go back and forth.
                if m.len() <= FEW / 2 {
                    *self = Reporters::Few(std::mem::take(m).into_iter().collect());
                }
            }
        }
    }

    /// The largest socket count reported.
    pub fn max_sockets(&self) -> Option<u32> {
        match self {
            Reporters::Few(v) => v.iter().map(|(_, n)| *n).max(),
            Reporters::Many(m) => m.values().copied().max(),
        }
    }

    /// The process of the last client row, in key order, that names one.
    pub(super) fn last_client_process(&self) -> Option<&str> {
        let client =
            |(_, obs): &&Reporter| obs.direction == Direction::Client && !obs.process.is_empty();
        let found = match self {
            Reporters::Few(v) => v.iter().rev().map(|(r, _)| r).find(client),
            Reporters::Many(m) => m.keys().rev().find(client),
        };
        found.map(|(_, obs)| &*obs.process)
    }
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::topology::ingest::tests::obs;
    use crate::topology::model::Protocol;

    #[test]
    fn reporters_keep_key_order_whether_few_or_many() {
        let reporter = |n: u16, direction: Direction| {
            let mut o = obs("10.0.0.2", 443, Protocol::Tcp);
            o.direction = direction;
            o.process = format!("p{n:02}").into();
            (format!("a{}", n % 3), o)
        };
        let mut r = Reporters::default();
        let mut truth = BTreeMap::new();
        for n in [5u16, 1, 19, 3, 12, 7, 0, 15, 9, 2, 18, 11, 4, 16] {
            let direction = if n % 4 == 0 {
                Direction::Server
            } else {
                Direction::Client
            };
            r.insert(reporter(n, direction), u32::from(n));
            truth.insert(reporter(n, direction), u32::from(n));
            let last = truth
                .keys()
                .rev()
                .find(|(_, o)| o.direction == Direction::Client)
                .map(|(_, o)| &*o.process);
            assert_eq!(r.last_client_process(), last, "after {n}");
            assert_eq!(r.max_sockets(), truth.values().copied().max());
            assert_eq!(r.len(), truth.len());
        }
        assert!(matches!(r, Reporters::Many(_)));
        for k in truth.keys().cloned().collect::<Vec<_>>() {
            r.remove(&k);
            truth.remove(&k);
            assert_eq!(r.len(), truth.len());
            assert_eq!(r.max_sockets(), truth.values().copied().max());
        }
        assert_eq!(r, Reporters::Few(Vec::new()));
    }
}
