//! The rendezvous of a data-parallel run's ranks on localhost (plain TCP, no GPU): every rank gets
//! rank 0's payload; a rank that does not come, or a missing rank 0, is an error within the
//! timeout; the standard variables are parsed and checked.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use trainer::dist::{rendezvous, Listener, World};

fn world(rank: usize, size: usize, port: u16) -> World {
    World {
        rank,
        size,
        local_rank: rank,
        master: format!("127.0.0.1:{port}"),
    }
}

#[test]
fn every_rank_gets_rank_0s_payload() {
    let listener = Listener::bind("127.0.0.1:0").unwrap();
    let port = listener.port().unwrap();
    let id: Vec<u8> = (0..128u8).collect();
    let timeout = Duration::from_secs(20);
    let got: Vec<Vec<u8>> = std::thread::scope(|s| {
        let mut hs = Vec::new();
        // The other ranks first: they retry until rank 0 listens.
        for r in (1..4).rev() {
            hs.push(s.spawn(move || rendezvous(&world(r, 4, port), None, &[], timeout)));
        }
        let id = &id;
        hs.push(s.spawn(move || rendezvous(&world(0, 4, port), Some(listener), id, timeout)));
        hs.into_iter().map(|h| h.join().unwrap().unwrap()).collect()
    });
    assert!(got.iter().all(|g| *g == id));
}

#[test]
fn a_rank_that_does_not_come_is_an_error_within_the_timeout() {
    let listener = Listener::bind("127.0.0.1:0").unwrap();
    let port = listener.port().unwrap();
    let t0 = Instant::now();
    let timeout = Duration::from_secs(1);
    let (r0, r1) = std::thread::scope(|s| {
        let h1 = s.spawn(move || rendezvous(&world(1, 3, port), None, &[], timeout));
        let r0 = rendezvous(&world(0, 3, port), Some(listener), b"id", timeout);
        (r0, h1.join().unwrap())
    });
    let e = r0.unwrap_err().to_string();
    assert!(e.contains("ranks [2] did not arrive within 1 s"), "{e}");
    // Rank 1 came but never got the payload: its wait ends too.
    assert!(r1.is_err());
    assert!(t0.elapsed() < Duration::from_secs(10));
}

#[test]
fn without_rank_0_the_others_stop_within_the_timeout() {
    // A port nobody listens on: bind one, read its number, close it.
    let port = Listener::bind("127.0.0.1:0").unwrap().port().unwrap();
    let t0 = Instant::now();
    let e = rendezvous(&world(1, 2, port), None, &[], Duration::from_secs(1))
        .unwrap_err()
        .to_string();
    assert!(e.contains("rank 0 did not listen"), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(10));
}

#[test]
fn a_rank_of_another_world_is_refused() {
    let listener = Listener::bind("127.0.0.1:0").unwrap();
    let port = listener.port().unwrap();
    let timeout = Duration::from_secs(5);
    let r0 = std::thread::scope(|s| {
        s.spawn(move || rendezvous(&world(1, 3, port), None, &[], timeout));
        rendezvous(&world(0, 2, port), Some(listener), b"id", timeout)
    });
    let e = r0.unwrap_err().to_string();
    assert!(
        e.contains("says it is rank 1 of 3, this run has 2 ranks"),
        "{e}"
    );
}

#[test]
fn the_standard_variables() {
    let vars = |pairs: &[(&str, &str)]| {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        World::from_vars(move |k| m.get(k).cloned())
    };
    assert_eq!(vars(&[]).unwrap(), None);
    let w = vars(&[
        ("WORLD_SIZE", "8"),
        ("RANK", "5"),
        ("LOCAL_RANK", "1"),
        ("MASTER_ADDR", "node0"),
        ("MASTER_PORT", "29500"),
    ])
    .unwrap()
    .unwrap();
    assert_eq!(
        w,
        World {
            rank: 5,
            size: 8,
            local_rank: 1,
            master: "node0:29500".into()
        }
    );
    let e = vars(&[("WORLD_SIZE", "2"), ("MASTER_PORT", "1")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("RANK is not"), "{e}");
    let e = vars(&[("WORLD_SIZE", "2"), ("RANK", "2"), ("MASTER_PORT", "1")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("RANK=2 is not a rank of WORLD_SIZE=2"), "{e}");
}
