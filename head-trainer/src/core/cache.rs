//! A bounded least-recently-used map of embeddings of classified photos.
//!
//! Enrolled photos are in the store; photos that are only classified are not, yet the
//! evaluation classifies every test photo once per head. Keeping the last N embeddings (keyed
//! by tenant, model and content hash, so a tenant never benefits from another's photos) makes
//! those repeats cost a hash instead of a backbone pass. O(log n) per operation with a
//! tick-ordered index; no unsafe linked list needed at these sizes.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

type Key = (String, String, [u8; 32]);

pub struct EmbeddingLru {
    capacity: usize,
    /// One key space for every tenant (`--share-embedding-cache`).
    shared: bool,
    tick: u64,
    map: HashMap<Key, (Arc<Vec<f32>>, u64)>,
    order: BTreeMap<u64, Key>,
}

impl EmbeddingLru {
    pub fn new(capacity: usize, shared: bool) -> Self {
        Self {
            capacity,
            shared,
            tick: 0,
            map: HashMap::new(),
            order: BTreeMap::new(),
        }
    }

    fn key(&self, tenant: &str, model: &str, hash: &[u8; 32]) -> Key {
        let tenant = if self.shared { "" } else { tenant };
        (tenant.to_string(), model.to_string(), *hash)
    }

    pub fn get(&mut self, tenant: &str, model: &str, hash: &[u8; 32]) -> Option<Arc<Vec<f32>>> {
        let key = self.key(tenant, model, hash);
        self.tick += 1;
        let (v, t) = self.map.get_mut(&key)?;
        self.order.remove(t);
        *t = self.tick;
        self.order.insert(self.tick, key);
        Some(Arc::clone(v))
    }

    pub fn put(&mut self, tenant: &str, model: &str, hash: &[u8; 32], v: Arc<Vec<f32>>) {
        if self.capacity == 0 {
            return;
        }
        let key = self.key(tenant, model, hash);
        self.tick += 1;
        if let Some((_, t)) = self.map.insert(key.clone(), (v, self.tick)) {
            self.order.remove(&t);
        }
        self.order.insert(self.tick, key);
        while self.map.len() > self.capacity {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            self.map.remove(&oldest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used() {
        let mut c = EmbeddingLru::new(2, false);
        let v = |x: f32| Arc::new(vec![x]);
        c.put("t", "m", &[1; 32], v(1.0));
        c.put("t", "m", &[2; 32], v(2.0));
        assert!(c.get("t", "m", &[1; 32]).is_some()); // 1 is now the most recent
        c.put("t", "m", &[3; 32], v(3.0));
        assert!(c.get("t", "m", &[2; 32]).is_none());
        assert!(c.get("t", "m", &[1; 32]).is_some());
        assert!(c.get("t", "m", &[3; 32]).is_some());
        assert!(
            c.get("other", "m", &[3; 32]).is_none(),
            "tenants do not share entries"
        );
    }

    #[test]
    fn shared_cache_answers_every_tenant_but_keeps_models_apart() {
        let mut c = EmbeddingLru::new(4, true);
        c.put("a", "m", &[1; 32], Arc::new(vec![1.0]));
        assert_eq!(c.get("b", "m", &[1; 32]).as_deref(), Some(&vec![1.0]));
        assert!(c.get("b", "other-model", &[1; 32]).is_none());
    }
}
