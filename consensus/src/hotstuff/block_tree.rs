//! The block tree: uncommitted blocks hanging off the last committed block (the root),
//! the 2-chain commit of a chain, and pruning of what can no longer be committed.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bulwark_crypto::Digest;

use super::types::Block;
use crate::protocol::Height;

/// Committed blocks kept in memory to answer peers' sync requests; older ones are
/// read from the host's storage through a load action.
const COMMITTED_RETAINED: u64 = 256;

#[derive(Debug)]
pub struct BlockTree {
    /// The root and every block known to descend from it, by digest.
    blocks: BTreeMap<Digest, Block>,
    children: BTreeMap<Digest, BTreeSet<Digest>>,
    root: Digest,
    /// Recently committed blocks (the root's ancestors), for sync requests.
    committed: BTreeMap<Digest, Block>,
    committed_by_height: BTreeMap<Height, Digest>,
}

/// Why a block could not join the tree.
#[derive(Debug, PartialEq, Eq)]
pub enum InsertError {
    /// Its parent is unknown: fetch it first.
    MissingParent(Digest),
    /// It does not extend the committed root: it can never be committed.
    Conflicts,
}

impl BlockTree {
    /// A tree whose root is `root` (genesis, or the last executed block after restart).
    pub fn new(root: Block) -> BlockTree {
        let digest = root.digest();
        let mut blocks = BTreeMap::new();
        blocks.insert(digest, root);
        BlockTree {
            blocks,
            children: BTreeMap::new(),
            root: digest,
            committed: BTreeMap::new(),
            committed_by_height: BTreeMap::new(),
        }
    }

    pub fn root(&self) -> &Block {
        // The root is inserted at construction and only replaced by a present block.
        &self.blocks[&self.root]
    }

    pub fn root_digest(&self) -> Digest {
        self.root
    }

    pub fn contains(&self, digest: &Digest) -> bool {
        self.blocks.contains_key(digest)
    }

    /// A block of the tree or a recently committed one.
    pub fn get(&self, digest: &Digest) -> Option<&Block> {
        self.blocks.get(digest).or_else(|| self.committed.get(digest))
    }

    /// Adds a block whose parent is in the tree. Adding a known block is a no-op.
    pub fn insert(&mut self, block: Block, digest: Digest) -> Result<bool, InsertError> {
        if self.blocks.contains_key(&digest) {
            return Ok(false);
        }
        if block.height <= self.root().height {
            return Err(InsertError::Conflicts);
        }
        let Some(parent) = self.blocks.get(&block.parent) else {
            return if self.committed.contains_key(&block.parent) {
                Err(InsertError::Conflicts)
            } else {
                Err(InsertError::MissingParent(block.parent))
            };
        };
        if parent.height.next() != block.height || parent.round >= block.round {
            return Err(InsertError::Conflicts);
        }
        self.children.entry(block.parent).or_default().insert(digest);
        self.blocks.insert(digest, block);
        Ok(true)
    }

    /// Whether `descendant` is `ancestor` or extends it, within the tree.
    pub fn extends(&self, descendant: &Digest, ancestor: &Digest) -> bool {
        let mut cursor = *descendant;
        loop {
            if cursor == *ancestor {
                return true;
            }
            match self.blocks.get(&cursor) {
                Some(b) if cursor != self.root => cursor = b.parent,
                _ => return false,
            }
        }
    }

    /// Commits `digest` and its uncommitted ancestors; returns them oldest first and
    /// makes `digest` the new root. Blocks that do not extend it are pruned.
    pub fn commit(&mut self, digest: &Digest) -> Vec<Block> {
        if *digest == self.root || !self.extends(digest, &self.root) {
            return Vec::new();
        }
        let mut chain = Vec::new();
        let mut cursor = *digest;
        while cursor != self.root {
            let Some(block) = self.blocks.get(&cursor) else { break };
            chain.push((cursor, block.clone()));
            cursor = block.parent;
        }
        chain.reverse();
        let old_root = self.root;
        self.root = *digest;
        self.prune(old_root);
        chain.into_iter().map(|(_, b)| b).collect()
    }

    /// Keeps only the root and its descendants; moves the committed chain below the root
    /// to the bounded committed window.
    fn prune(&mut self, old_root: Digest) {
        let mut keep = BTreeSet::new();
        let mut queue = VecDeque::from([self.root]);
        while let Some(d) = queue.pop_front() {
            if keep.insert(d)
                && let Some(kids) = self.children.get(&d)
            {
                queue.extend(kids.iter().copied());
            }
        }
        // The committed chain from the old root (inclusive) up to the new root (exclusive).
        let mut committed_chain = BTreeSet::new();
        let mut cursor = self.blocks.get(&self.root).map(|b| b.parent);
        while let Some(d) = cursor {
            committed_chain.insert(d);
            if d == old_root {
                break;
            }
            cursor = self.blocks.get(&d).map(|b| b.parent);
        }
        let removed: Vec<Digest> = self.blocks.keys().filter(|d| !keep.contains(*d)).copied().collect();
        for d in removed {
            self.children.remove(&d);
            if let Some(block) = self.blocks.remove(&d)
                && committed_chain.contains(&d)
            {
                self.committed_by_height.insert(block.height, d);
                self.committed.insert(d, block);
            }
        }
        while self.committed_by_height.len() as u64 > COMMITTED_RETAINED {
            if let Some((_, d)) = self.committed_by_height.pop_first() {
                self.committed.remove(&d);
            }
        }
    }

    /// `digest` and up to `max - 1` ancestors, newest first, as far as memory holds them.
    /// Genesis (height 0) is never included.
    pub fn chain_ending_at(&self, digest: &Digest, max: usize) -> Vec<Block> {
        let mut out = Vec::new();
        let mut cursor = *digest;
        while out.len() < max {
            match self.get(&cursor) {
                Some(b) if b.height.0 > 0 => {
                    out.push(b.clone());
                    cursor = b.parent;
                }
                _ => break,
            }
        }
        out
    }

    /// Blocks in the tree (including the root).
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }
}
