//! Multi-process runs, started like `torchrun`: every process reads `RANK`,
//! `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR` and `MASTER_PORT`; rank 0
//! creates the NCCL unique id and sends it to the others over TCP
//! ([`exchange_id`]).
//!
//! What is here: the environment ([`DistEnv`]) and the id exchange, both
//! tested without a GPU. What is not (yet): the NCCL send/recv ring itself —
//! [`require_single_process`] makes a multi-process launch fail with a clear
//! error instead of silently running `WORLD_SIZE` independent copies.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::error::{Result, RuntimeError};

/// A process's place in a torchrun-style launch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistEnv {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
}

fn bad(msg: String) -> RuntimeError {
    RuntimeError::Invalid(format!("torchrun-style environment: {msg}"))
}

impl DistEnv {
    /// Reads the process environment; `Ok(None)` when `WORLD_SIZE` is unset
    /// (a single-process run).
    pub fn from_env() -> Result<Option<DistEnv>> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// [`DistEnv::from_env`] over any variable source (testable).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Option<DistEnv>> {
        let Some(ws) = get("WORLD_SIZE") else {
            return Ok(None);
        };
        let num = |k: &str, default: Option<&str>| -> Result<usize> {
            let v = get(k)
                .or_else(|| default.map(str::to_string))
                .ok_or_else(|| bad(format!("WORLD_SIZE is set but {k} is not")))?;
            v.trim()
                .parse::<usize>()
                .map_err(|_| bad(format!("{k}={v} is not a non-negative integer")))
        };
        let world_size = ws
            .trim()
            .parse::<usize>()
            .map_err(|_| bad(format!("WORLD_SIZE={ws} is not a positive integer")))?;
        if world_size == 0 {
            return Err(bad("WORLD_SIZE must be at least 1".into()));
        }
        let rank = num("RANK", None)?;
        if rank >= world_size {
            return Err(bad(format!(
                "RANK={rank} must be below WORLD_SIZE={world_size}"
            )));
        }
        let local_rank = num("LOCAL_RANK", Some("0"))?;
        let master_addr = get("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into());
        let port = num("MASTER_PORT", Some("29500"))?;
        let master_port = u16::try_from(port)
            .ok()
            .filter(|&p| p > 0)
            .ok_or_else(|| bad(format!("MASTER_PORT={port} is not a TCP port")))?;
        Ok(Some(DistEnv {
            rank,
            world_size,
            local_rank,
            master_addr,
            master_port,
        }))
    }
}

/// Errors when this process was started as one of several (WORLD_SIZE > 1):
/// the NCCL ring across processes is not implemented in this build.
pub fn require_single_process() -> Result<()> {
    match DistEnv::from_env()? {
        Some(env) if env.world_size > 1 => Err(RuntimeError::Unsupported {
            backend: "cuda",
            what: format!(
                "a multi-process ring (WORLD_SIZE={}, RANK={}): NCCL send/recv across processes \
                 is not implemented in this build; run one process with --ranks R, which spreads \
                 the ring over every visible GPU of this machine",
                env.world_size, env.rank
            ),
        }),
        _ => Ok(()),
    }
}

/// Sends `id` from rank 0 to every other rank over TCP and returns it on
/// every rank: rank 0 listens on `MASTER_PORT` and answers `world_size - 1`
/// connections; the others retry connecting until `timeout` (rank 0 may
/// start later). `id` is only read on rank 0.
pub fn exchange_id(env: &DistEnv, id: &[u8], timeout: Duration) -> Result<Vec<u8>> {
    let io = |what: &str, e: std::io::Error| RuntimeError::Io {
        path: format!("{}:{} ({what})", env.master_addr, env.master_port),
        source: e,
    };
    if env.rank == 0 {
        let listener =
            TcpListener::bind(("0.0.0.0", env.master_port)).map_err(|e| io("listen", e))?;
        let len = u32::try_from(id.len()).map_err(|_| bad("id too long".into()))?;
        for _ in 1..env.world_size {
            let (mut s, _) = listener.accept().map_err(|e| io("accept", e))?;
            s.write_all(&len.to_le_bytes())
                .and_then(|_| s.write_all(id))
                .map_err(|e| io("send id", e))?;
        }
        return Ok(id.to_vec());
    }
    let addr = (env.master_addr.as_str(), env.master_port)
        .to_socket_addrs()
        .map_err(|e| io("resolve", e))?
        .next()
        .ok_or_else(|| bad(format!("MASTER_ADDR={} does not resolve", env.master_addr)))?;
    let deadline = Instant::now() + timeout;
    let mut s = loop {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
            Ok(s) => break s,
            Err(e) if Instant::now() >= deadline => return Err(io("connect to rank 0", e)),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    s.set_read_timeout(Some(timeout))
        .map_err(|e| io("timeout", e))?;
    let mut len = [0u8; 4];
    s.read_exact(&mut len).map_err(|e| io("receive id", e))?;
    let mut id = vec![0u8; u32::from_le_bytes(len) as usize];
    s.read_exact(&mut id).map_err(|e| io("receive id", e))?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> Result<Option<DistEnv>> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        DistEnv::from_lookup(|k| m.get(k).cloned())
    }

    #[test]
    fn parses_torchrun_variables() {
        assert_eq!(env(&[]).unwrap(), None);
        let e = env(&[
            ("WORLD_SIZE", "4"),
            ("RANK", "2"),
            ("LOCAL_RANK", "0"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "1234"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            (e.rank, e.world_size, e.local_rank, e.master_port),
            (2, 4, 0, 1234)
        );
        assert_eq!(e.master_addr, "node0");
        let err = env(&[("WORLD_SIZE", "2"), ("RANK", "2")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("RANK=2"), "{err}");
        let err = env(&[("WORLD_SIZE", "2")]).unwrap_err().to_string();
        assert!(err.contains("RANK"), "{err}");
        let err = env(&[("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_PORT", "70000")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("MASTER_PORT"), "{err}");
    }

    /// Three "processes" (threads) receive rank 0's id, even when the
    /// others start before rank 0 listens.
    #[test]
    fn rank0_id_reaches_every_rank() {
        let port = {
            // A free port: bind to 0, read it, release it.
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let id: Vec<u8> = (0..128u8).collect();
        let got: Vec<Vec<u8>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..3)
                .rev()
                .map(|rank| {
                    let id = id.clone();
                    s.spawn(move || {
                        let e = DistEnv {
                            rank,
                            world_size: 3,
                            local_rank: rank,
                            master_addr: "127.0.0.1".into(),
                            master_port: port,
                        };
                        if rank == 0 {
                            std::thread::sleep(Duration::from_millis(100));
                        }
                        let mine = if rank == 0 { id } else { Vec::new() };
                        exchange_id(&e, &mine, Duration::from_secs(10)).unwrap()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for g in got {
            assert_eq!(g, id);
        }
    }
}
