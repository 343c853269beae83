//! LWW sync on arbitrary bytes. Decoded as a batch, it merges without panicking, merging it
//! again changes nothing, and the map it leaves survives a postcard round trip. Read as a
//! script of writes and lossy, duplicating, reordering deliveries between a cloud and two
//! edges, it never breaks ownership, and once the links are reliable the replicas quiesce
//! with identical maps holding, per key, the latest write by HLC.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use shared::hlc::Hlc;
use shared::sync::{Batch, Entry, LwwMap, Role, Scope, SyncSession};

const DRIFT: u64 = 1_000;
const ALL: usize = usize::MAX;

fuzz_target!(|data: &[u8]| {
    decode_and_merge(data);
    script(data);
});

fn other(role: Role) -> Role {
    match role {
        Role::Cloud => Role::Edge,
        Role::Edge => Role::Cloud,
    }
}

fn contents(m: &LwwMap) -> Vec<(Scope, String, Entry)> {
    m.iter()
        .map(|(s, k, e)| (s, k.to_owned(), e.clone()))
        .collect()
}

fn decode_and_merge(data: &[u8]) {
    let Ok(batch) = Batch::from_bytes(data) else {
        return;
    };
    let now = 1_000_000;
    for role in [Role::Cloud, Role::Edge] {
        let mut map = LwwMap::new(role);
        let mut hlc = Hlc::new(7, DRIFT);
        let mut session = SyncSession::new(3, other(role));
        let got = session.accept_batch(&mut map, &mut hlc, batch.clone(), now);
        let n = batch.entries.len();
        assert!(got.report.changed.len() + got.report.rejected.len() <= n);
        let seq = map.last_seq();
        let again = session.accept_batch(&mut map, &mut hlc, batch.clone(), now);
        assert!(
            again.report.changed.is_empty(),
            "a re-merge changed the map"
        );
        assert_eq!(again.report.rejected.len(), got.report.rejected.len());
        assert_eq!(map.last_seq(), seq);
        for (scope, _, e) in map.iter() {
            assert!(scope.ownership().permits(e.origin));
            assert!(e.ts.wall_ms <= now + DRIFT);
        }
        let bytes = map.to_bytes().expect("a map encodes");
        assert_eq!(LwwMap::from_bytes(&bytes).as_ref(), Ok(&map));
        let mut copy = LwwMap::new(role);
        let report = copy.merge(map.changes_since(0, ALL, ALL).entries, &mut hlc, now);
        assert!(report.rejected.is_empty());
        assert_eq!(contents(&copy), contents(&map));
    }
}

enum Msg {
    Batch(Batch),
    Ack(u64),
}

struct Node {
    map: LwwMap,
    hlc: Hlc,
    sessions: BTreeMap<usize, SyncSession>,
}

struct World {
    nodes: Vec<Node>,
    ids: [u64; 3],
    links: [(usize, usize); 4],
    chans: BTreeMap<(usize, usize), Vec<Msg>>,
    now: u64,
    best: BTreeMap<(Scope, String), Entry>,
}

fn role_of(i: usize) -> Role {
    if i == 0 {
        Role::Cloud
    } else {
        Role::Edge
    }
}

impl World {
    fn new(ids: [u64; 3]) -> World {
        let links = [(0, 1), (1, 0), (0, 2), (2, 0)];
        let nodes = (0..3)
            .map(|i| Node {
                map: LwwMap::new(role_of(i)),
                hlc: Hlc::new(ids[i], DRIFT),
                sessions: links
                    .iter()
                    .filter(|l| l.0 == i)
                    .map(|l| (l.1, SyncSession::new(ids[l.1], role_of(l.1))))
                    .collect(),
            })
            .collect();
        World {
            nodes,
            ids,
            links,
            chans: BTreeMap::new(),
            now: 1_000_000,
            best: BTreeMap::new(),
        }
    }

    fn write(&mut self, i: usize, scope: Scope, key: String, value: Option<Vec<u8>>) {
        let node = &mut self.nodes[i];
        let before = node.map.last_seq();
        match node.map.write(&mut node.hlc, scope, &key, value, self.now) {
            Ok(_) => {
                let e = node.map.entry(scope, &key).expect("just written").clone();
                let slot = self.best.entry((scope, key)).or_insert(e.clone());
                if e > *slot {
                    *slot = e;
                }
            }
            Err(_) => {
                assert!(!scope.ownership().permits(role_of(i)));
                assert_eq!(node.map.last_seq(), before);
            }
        }
    }

    fn send(&mut self, link: usize, max_entries: usize) -> bool {
        let (a, b) = self.links[link];
        let node = &mut self.nodes[a];
        let session = node.sessions.get_mut(&b).expect("session");
        match session.next_batch(&node.map, max_entries, ALL) {
            Some(batch) => {
                self.chans
                    .entry((a, b))
                    .or_default()
                    .push(Msg::Batch(batch));
                true
            }
            None => false,
        }
    }

    fn deliver(&mut self, link: usize, pick: usize, duplicate: bool) {
        let (a, b) = self.links[link];
        let Some(chan) = self.chans.get_mut(&(a, b)) else {
            return;
        };
        if chan.is_empty() {
            return;
        }
        let i = pick % chan.len();
        let msg = if duplicate {
            match &chan[i] {
                Msg::Batch(batch) => Msg::Batch(batch.clone()),
                Msg::Ack(u) => Msg::Ack(*u),
            }
        } else {
            chan.remove(i)
        };
        let node = &mut self.nodes[b];
        let session = node.sessions.get_mut(&a).expect("session");
        match msg {
            Msg::Batch(batch) => {
                let got = session.accept_batch(&mut node.map, &mut node.hlc, batch, self.now);
                assert!(got.report.rejected.is_empty(), "{:?}", got.report.rejected);
                self.chans
                    .entry((b, a))
                    .or_default()
                    .push(Msg::Ack(got.ack));
            }
            Msg::Ack(upto) => session
                .accept_ack(upto, &node.map)
                .expect("acks never run ahead"),
        }
    }

    fn settle(&mut self) {
        self.chans.clear();
        for n in &mut self.nodes {
            for s in n.sessions.values_mut() {
                s.rewind();
            }
        }
        for _ in 0..8 {
            let mut moved = false;
            for link in 0..self.links.len() {
                while self.send(link, 3) {
                    moved = true;
                    self.deliver(link, 0, false);
                    self.deliver(link ^ 1, 0, false);
                }
            }
            if !moved {
                return;
            }
        }
        panic!("sync did not quiesce");
    }
}

fn script(data: &[u8]) {
    let Some((&first, mut rest)) = data.split_first() else {
        return;
    };
    // Which node id each replica has, so that ties go either way.
    let ids = match first % 3 {
        0 => [1, 2, 3],
        1 => [3, 1, 2],
        _ => [2, 3, 1],
    };
    let mut world = World::new(ids);
    while let [op, a, b, c, tail @ ..] = rest {
        rest = tail;
        let link = usize::from(*a) % 4;
        match op % 8 {
            0 | 1 => {
                let value = (c % 5 != 0).then(|| vec![*c; usize::from(c % 3)]);
                world.write(
                    usize::from(*a) % 3,
                    Scope::ALL[usize::from(*b) % 4],
                    format!("k{}", b / 4 % 4),
                    value,
                );
            }
            2 => world.now += u64::from(*a % 8),
            3 => {
                world.send(link, usize::from(*b % 4) + 1);
            }
            4 | 5 => world.deliver(link, usize::from(*b), c % 4 == 0),
            6 => {
                if let Some(chan) = world.chans.get_mut(&world.links[link]) {
                    if !chan.is_empty() {
                        let i = usize::from(*b) % chan.len();
                        chan.remove(i);
                    }
                }
            }
            _ => {
                let (x, y) = world.links[link];
                world.nodes[x]
                    .sessions
                    .get_mut(&y)
                    .expect("session")
                    .rewind();
            }
        }
    }
    world.settle();
    let expected: Vec<_> = world
        .best
        .iter()
        .map(|((s, k), e)| (*s, k.clone(), e.clone()))
        .collect();
    for node in &world.nodes {
        assert_eq!(contents(&node.map), expected, "replicas diverged");
        for s in node.sessions.values() {
            assert!(s.is_quiescent(&node.map));
        }
        for (scope, _, e) in node.map.iter() {
            assert!(scope.ownership().permits(e.origin));
            let writer = world.ids.iter().position(|&id| id == e.ts.node);
            assert_eq!(writer.map(role_of), Some(e.origin));
        }
    }
}
