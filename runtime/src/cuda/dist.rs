//! Multi-process runs, started like `torchrun`: every process reads `RANK`,
//! `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR` and `MASTER_PORT` ([`DistEnv`]).
//!
//! Before any GPU work the processes meet over TCP ([`Control::connect`]):
//! every rank sends rank 0 a [`RunHeader`] (spec, shapes, dtype, sharding,
//! a fingerprint of the inputs); rank 0 refuses the run on every rank when
//! one differs, else creates the NCCL unique id and sends it back. The same
//! connections later carry each rank's output rows to rank 0
//! ([`Control::gather`]). All of it is host code, tested without a GPU.

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

/// An error of the rendezvous between ranks.
fn refused(msg: String) -> RuntimeError {
    RuntimeError::Invalid(format!("multi-process run: {msg}"))
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

/// Seconds a rank waits for the others at the TCP rendezvous
/// (`MIXC_DIST_TIMEOUT`, default 300: ranks on several machines start at
/// different times).
pub fn rendezvous_timeout() -> Result<Duration> {
    match std::env::var("MIXC_DIST_TIMEOUT") {
        Err(_) => Ok(Duration::from_secs(300)),
        Ok(v) => v
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|s| s.is_finite() && *s > 0.0)
            .map(Duration::from_secs_f64)
            .ok_or_else(|| {
                bad(format!(
                    "MIXC_DIST_TIMEOUT={v} is not a positive number of seconds"
                ))
            }),
    }
}

/// What every rank of one multi-process run must agree on; compared field by
/// field at the rendezvous so a mismatch names what differs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunHeader {
    pub world_size: usize,
    /// SHA-256 prefix of the spec (its full IR, so shape overrides count).
    pub spec: String,
    pub batch: usize,
    pub seq: usize,
    pub dtype: String,
    pub sharding: String,
    /// SHA-256 prefix of a sample of q, k, v and the extra inputs (every
    /// rank builds its own inputs, e.g. from `--seed`: different seeds
    /// would silently mix two problems).
    pub inputs: String,
}

const HEADER_FIELDS: [&str; 7] = [
    "world_size",
    "spec",
    "batch",
    "seq",
    "dtype",
    "sharding",
    "inputs",
];

fn short_hash(h: sha2::Sha256) -> String {
    use sha2::Digest;
    h.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl RunHeader {
    pub fn new(
        spec: &mixc_dsl::ir::MixerSpec,
        inputs: &crate::tensor::MixerInputs,
        dtype: mixc_dsl::ir::DType,
        sharding: crate::ring::Sharding,
        world_size: usize,
    ) -> RunHeader {
        use sha2::Digest;
        let mut hs = sha2::Sha256::new();
        hs.update(format!("{spec:?}").as_bytes());
        // A strided sample (about 4096 values per tensor) plus the lengths:
        // cheap at any size, and different seeds or files differ in it.
        let mut hi = sha2::Sha256::new();
        let mut sample = |name: &str, data: &mut dyn Iterator<Item = f32>, len: usize| {
            hi.update(name.as_bytes());
            hi.update((len as u64).to_le_bytes());
            for x in data.step_by((len / 4096).max(1)) {
                hi.update(x.to_le_bytes());
            }
        };
        for (name, t) in [("q", &inputs.q), ("k", &inputs.k), ("v", &inputs.v)] {
            sample(name, &mut t.data.iter().copied(), t.data.len());
        }
        for (name, t) in &inputs.extra {
            let n: usize = t.shape().iter().product();
            let vals: Vec<f32> = match t {
                crate::tensor::ExtraTensor::F32(x) => x.data.to_vec(),
                crate::tensor::ExtraTensor::I32(x) => x.data.iter().map(|&v| v as f32).collect(),
            };
            sample(name, &mut vals.into_iter(), n);
        }
        RunHeader {
            world_size,
            spec: short_hash(hs),
            batch: inputs.batch,
            seq: inputs.seq,
            dtype: dtype.name().to_string(),
            sharding: sharding.name().to_string(),
            inputs: short_hash(hi),
        }
    }

    fn values(&self) -> [String; 7] {
        [
            self.world_size.to_string(),
            self.spec.clone(),
            self.batch.to_string(),
            self.seq.to_string(),
            self.dtype.clone(),
            self.sharding.clone(),
            self.inputs.clone(),
        ]
    }

    fn encode(&self) -> String {
        HEADER_FIELDS
            .iter()
            .zip(self.values())
            .map(|(k, v)| format!("{k}={v}\n"))
            .collect()
    }

    fn decode(s: &str) -> Result<RunHeader> {
        let get = |k: &str| -> Result<String> {
            s.lines()
                .find_map(|l| l.strip_prefix(k).and_then(|r| r.strip_prefix('=')))
                .map(str::to_string)
                .ok_or_else(|| refused(format!("a rank sent a header without `{k}`")))
        };
        let num = |k: &str| -> Result<usize> {
            get(k)?
                .parse()
                .map_err(|_| refused(format!("a rank sent a header with a bad `{k}`")))
        };
        Ok(RunHeader {
            world_size: num("world_size")?,
            spec: get("spec")?,
            batch: num("batch")?,
            seq: num("seq")?,
            dtype: get("dtype")?,
            sharding: get("sharding")?,
            inputs: get("inputs")?,
        })
    }

    /// `None` when equal, else every differing field with both values.
    pub fn mismatch(&self, other: &RunHeader, other_rank: usize) -> Option<String> {
        let diffs: Vec<String> = HEADER_FIELDS
            .iter()
            .zip(self.values().iter().zip(other.values()))
            .filter(|(_, (a, b))| *a != b)
            .map(|(k, (a, b))| format!("{k} {a} on rank 0 but {b} on rank {other_rank}"))
            .collect();
        (!diffs.is_empty()).then(|| {
            format!(
                "the ranks disagree on the run: {} (every rank must run the same spec and \
                 shapes, inputs, dtype and sharding)",
                diffs.join(", ")
            )
        })
    }
}

const MAGIC: &[u8; 8] = b"MIXCDST1";

fn write_frame(s: &mut TcpStream, bytes: &[u8]) -> std::io::Result<()> {
    s.write_all(&(bytes.len() as u64).to_le_bytes())?;
    s.write_all(bytes)
}

fn read_frame(s: &mut TcpStream, max: u64) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 8];
    s.read_exact(&mut len)?;
    let n = u64::from_le_bytes(len);
    if n > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a message of {n} bytes (at most {max} expected): not a mixc rank?"),
        ));
    }
    let mut v = vec![0u8; n as usize];
    s.read_exact(&mut v)?;
    Ok(v)
}

/// The TCP connections of a multi-process run: rank 0 holds one per other
/// rank (by rank), the others one to rank 0.
#[derive(Debug)]
pub struct Control {
    env: DistEnv,
    /// Rank 0: `peers[r - 1]` is rank `r`. Others: `peers[0]` is rank 0.
    peers: Vec<TcpStream>,
}

impl Control {
    fn io(&self, what: &str, e: std::io::Error) -> RuntimeError {
        io_err(&self.env, what, e)
    }

    /// The rendezvous: rank 0 listens on `MASTER_PORT` until every other rank
    /// connected and sent its header (or `timeout` passes, an error naming
    /// the port and how many ranks came); on a mismatch every rank fails with
    /// the differing fields. Then rank 0 calls `make_id` (the NCCL unique id)
    /// and every rank returns it. The others retry connecting to
    /// `MASTER_ADDR:MASTER_PORT` until `timeout` (rank 0 may start later).
    pub fn connect(
        env: &DistEnv,
        header: &RunHeader,
        make_id: impl FnOnce() -> Result<Vec<u8>>,
        timeout: Duration,
    ) -> Result<(Control, Vec<u8>)> {
        if env.rank == 0 {
            Self::serve(env, header, make_id, timeout)
        } else {
            Self::join(env, header, timeout)
        }
    }

    fn serve(
        env: &DistEnv,
        header: &RunHeader,
        make_id: impl FnOnce() -> Result<Vec<u8>>,
        timeout: Duration,
    ) -> Result<(Control, Vec<u8>)> {
        let io = |what: &str, e| io_err(env, what, e);
        let listener = TcpListener::bind(("0.0.0.0", env.master_port))
            .map_err(|e| io("rank 0 listening (is another run using this port?)", e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| io("listening", e))?;
        let deadline = Instant::now() + timeout;
        let mut peers: Vec<Option<TcpStream>> = (1..env.world_size).map(|_| None).collect();
        let mut problems = Vec::new();
        let mut joined = 0;
        while joined < env.world_size - 1 {
            let (mut s, from) = match listener.accept() {
                Ok(x) => x,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        let missing: Vec<String> = peers
                            .iter()
                            .enumerate()
                            .filter(|(_, p)| p.is_none())
                            .map(|(i, _)| (i + 1).to_string())
                            .collect();
                        problems.push(format!(
                            "rank 0 waited {:.0} s on port {} (MASTER_PORT) and rank(s) {} never \
                             connected; start every rank with MASTER_ADDR={} MASTER_PORT={} \
                             WORLD_SIZE={} (MIXC_DIST_TIMEOUT sets the wait)",
                            timeout.as_secs_f64(),
                            env.master_port,
                            missing.join(", "),
                            env.master_addr,
                            env.master_port,
                            env.world_size
                        ));
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                Err(e) => return Err(io("accepting a rank", e)),
            };
            s.set_nonblocking(false)
                .and_then(|_| s.set_read_timeout(Some(timeout)))
                .map_err(|e| io("accepting a rank", e))?;
            let hello =
                read_frame(&mut s, 1 << 16).map_err(|e| io("reading a rank's header", e))?;
            let Some(rest) = hello.strip_prefix(MAGIC.as_slice()) else {
                // Not a mixc rank (a port scanner, another program): ignore it.
                continue;
            };
            let text = String::from_utf8_lossy(rest.get(8..).unwrap_or_default()).to_string();
            let rank = rest
                .get(..8)
                .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()) as usize)
                .unwrap_or(usize::MAX);
            let slot = rank.checked_sub(1).filter(|&i| i < peers.len());
            let Some(i) = slot else {
                problems.push(format!(
                    "a process at {from} says it is rank {rank}, outside 1..{}",
                    env.world_size
                ));
                let _ = write_frame(&mut s, b"\x01a rank outside the world size");
                continue;
            };
            if peers[i].is_some() {
                problems.push(format!("two processes say they are rank {rank}"));
                let _ = write_frame(&mut s, b"\x01a duplicate rank");
                continue;
            }
            match RunHeader::decode(&text) {
                Ok(h) => {
                    if let Some(m) = header.mismatch(&h, rank) {
                        problems.push(m);
                    }
                }
                Err(e) => problems.push(e.to_string()),
            }
            // Keep accepting after a mismatch, so every rank hears why.
            peers[i] = Some(s);
            joined += 1;
        }
        let mut peers: Vec<TcpStream> = peers.into_iter().flatten().collect();
        let outcome = if problems.is_empty() {
            make_id()
        } else {
            Err(refused(problems.join("; ")))
        };
        // Every rank learns the outcome, so none is left waiting for NCCL.
        let reply = match &outcome {
            Ok(id) => [&[0u8][..], id].concat(),
            Err(e) => [&[1u8][..], e.to_string().as_bytes()].concat(),
        };
        for s in &mut peers {
            write_frame(s, &reply).map_err(|e| io("sending the NCCL id", e))?;
            s.set_read_timeout(None).map_err(|e| io("socket", e))?;
        }
        let id = outcome?;
        Ok((
            Control {
                env: env.clone(),
                peers,
            },
            id,
        ))
    }

    fn join(env: &DistEnv, header: &RunHeader, timeout: Duration) -> Result<(Control, Vec<u8>)> {
        let io = |what: &str, e| io_err(env, what, e);
        let addr = (env.master_addr.as_str(), env.master_port)
            .to_socket_addrs()
            .map_err(|e| io("resolving MASTER_ADDR", e))?
            .next()
            .ok_or_else(|| bad(format!("MASTER_ADDR={} does not resolve", env.master_addr)))?;
        let deadline = Instant::now() + timeout;
        let mut s = loop {
            match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    return Err(io(
                        &format!(
                            "rank {} could not reach rank 0 within {:.0} s (is rank 0 running, \
                             and MASTER_ADDR/MASTER_PORT its address? MIXC_DIST_TIMEOUT sets the wait)",
                            env.rank,
                            timeout.as_secs_f64()
                        ),
                        e,
                    ))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        let hello = [
            MAGIC.as_slice(),
            &(env.rank as u64).to_le_bytes(),
            header.encode().as_bytes(),
        ]
        .concat();
        write_frame(&mut s, &hello).map_err(|e| io("sending the run header", e))?;
        // Rank 0 answers once every rank has joined: wait as long as it does.
        s.set_read_timeout(Some(timeout + Duration::from_secs(5)))
            .map_err(|e| io("socket", e))?;
        let reply =
            read_frame(&mut s, 1 << 20).map_err(|e| io("waiting for rank 0's NCCL id", e))?;
        s.set_read_timeout(None).map_err(|e| io("socket", e))?;
        match reply.split_first() {
            Some((0, id)) => Ok((
                Control {
                    env: env.clone(),
                    peers: vec![s],
                },
                id.to_vec(),
            )),
            Some((_, msg)) => Err(RuntimeError::Invalid(format!(
                "{} (reported by rank 0)",
                String::from_utf8_lossy(msg)
            ))),
            None => Err(refused("rank 0 sent an empty reply".into())),
        }
    }

    /// Rank 0 gets every rank's bytes, by rank (its own `mine` first); the
    /// others send theirs and get `None`.
    pub fn gather(&mut self, mine: Vec<u8>) -> Result<Option<Vec<Vec<u8>>>> {
        if self.env.rank != 0 {
            let r = write_frame(&mut self.peers[0], &mine);
            r.map_err(|e| self.io("sending this rank's output to rank 0", e))?;
            return Ok(None);
        }
        let mut all = vec![mine];
        for i in 0..self.peers.len() {
            let got = read_frame(&mut self.peers[i], u64::MAX);
            let got = got.map_err(|e| self.io(&format!("receiving rank {}'s output", i + 1), e))?;
            all.push(got);
        }
        Ok(Some(all))
    }
}

fn io_err(env: &DistEnv, what: &str, e: std::io::Error) -> RuntimeError {
    RuntimeError::Io {
        path: format!("{}:{} ({what})", env.master_addr, env.master_port),
        source: e,
    }
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

    fn free_port() -> u16 {
        // Bind to 0, read the port, release it.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    }

    fn local(rank: usize, world_size: usize, port: u16) -> DistEnv {
        DistEnv {
            rank,
            world_size,
            local_rank: rank,
            master_addr: "127.0.0.1".into(),
            master_port: port,
        }
    }

    fn header(seq: usize) -> RunHeader {
        RunHeader {
            world_size: 3,
            spec: "abc".into(),
            batch: 2,
            seq,
            dtype: "f32".into(),
            sharding: "zigzag".into(),
            inputs: "def".into(),
        }
    }

    /// Runs the rendezvous on threads (rank 0 last, so the others retry),
    /// then gathers each rank's bytes on rank 0.
    /// What a rank ends with: the id, and on rank 0 everyone's bytes.
    type Outcome = Result<(Vec<u8>, Option<Vec<Vec<u8>>>)>;

    fn rendezvous(headers: Vec<RunHeader>) -> Vec<Outcome> {
        let port = free_port();
        let world = headers.len();
        let id: Vec<u8> = (0..128u8).collect();
        std::thread::scope(|s| {
            let hs: Vec<_> = headers
                .into_iter()
                .enumerate()
                .rev()
                .map(|(rank, h)| {
                    let id = id.clone();
                    s.spawn(move || {
                        if rank == 0 {
                            std::thread::sleep(Duration::from_millis(100));
                        }
                        let e = local(rank, world, port);
                        let (mut c, got) =
                            Control::connect(&e, &h, || Ok(id), Duration::from_secs(10))?;
                        let all = c.gather(vec![rank as u8; rank * 1000 + 1])?;
                        Ok((got, all))
                    })
                })
                .collect();
            let mut out: Vec<_> = hs.into_iter().map(|h| h.join().unwrap()).collect();
            out.reverse();
            out
        })
    }

    #[test]
    fn rank0_id_reaches_every_rank_and_outputs_come_back() {
        let got = rendezvous(vec![header(100); 3]);
        let id: Vec<u8> = (0..128u8).collect();
        for (rank, r) in got.into_iter().enumerate() {
            let (g, all) = r.unwrap();
            assert_eq!(g, id);
            if rank == 0 {
                let all = all.unwrap();
                assert_eq!(all.len(), 3);
                for (r, bytes) in all.iter().enumerate() {
                    assert_eq!(bytes, &vec![r as u8; r * 1000 + 1]);
                }
            } else {
                assert!(all.is_none());
            }
        }
    }

    /// One rank with another sequence length: every rank fails, and the
    /// message names the field and both values.
    #[test]
    fn mismatched_headers_fail_on_every_rank() {
        let got = rendezvous(vec![header(100), header(100), header(64)]);
        for r in got {
            let e = r.unwrap_err().to_string();
            assert!(e.contains("seq 100 on rank 0 but 64 on rank 2"), "{e}");
        }
    }

    #[test]
    fn header_roundtrip_and_fingerprint() {
        let h = header(7);
        assert_eq!(RunHeader::decode(&h.encode()).unwrap(), h);
        assert!(h.mismatch(&h, 1).is_none());
        let spec = mixc_dsl::parse_str(
            "mixer m { heads = 2; head_dim = 8; dtype = f32; score = dot(q, k); mask = causal; norm = softmax; }",
        )
        .unwrap();
        let x = crate::inputs::random_inputs(&spec, 1, 50, 1);
        let y = crate::inputs::random_inputs(&spec, 1, 50, 2);
        let mk = |x| RunHeader::new(&spec, x, spec.dtype, crate::ring::Sharding::Zigzag, 2);
        let x2 = x.clone();
        assert_eq!(mk(&x), mk(&x2));
        let m = mk(&x).mismatch(&mk(&y), 1).unwrap();
        assert!(
            m.starts_with("the ranks disagree on the run: inputs "),
            "{m}"
        );
    }

    /// Nobody at MASTER_ADDR:MASTER_PORT: the error names the address, port and wait.
    #[test]
    fn rendezvous_timeout_names_the_address() {
        let port = free_port();
        let e = Control::connect(
            &local(1, 2, port),
            &header(1),
            || unreachable!(),
            Duration::from_millis(300),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains(&format!("127.0.0.1:{port}")), "{e}");
        assert!(e.contains("could not reach rank 0"), "{e}");
        // Rank 0 alone: names the port and the missing rank.
        let e = Control::connect(
            &local(0, 2, port),
            &header(1),
            || Ok(vec![1]),
            Duration::from_millis(300),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains(&format!("port {port}")) && e.contains("rank(s) 1"),
            "{e}"
        );
    }
}
