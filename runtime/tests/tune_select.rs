//! The tuner's control flow with scripted timers: deterministic choice and
//! tie-break, wrong results never win, the default is always timed, the
//! budget stops new candidates, pruned candidates never reach the timer.
//! Also a real CPU run: the chosen configuration is never slower than the
//! default and reproduces the reference.

use mixc_runtime::cpu::CpuConfig;
use mixc_runtime::error::{Result, RuntimeError};
use mixc_runtime::tune::{
    self, choose, space, Candidate, CpuTiles, CpuTimer, CpuTimerOptions, Outcome, Sample, Timer,
    TuneOptions, TunedConfig,
};
use std::collections::HashMap;
use std::time::Duration;

fn cand(index: usize, bm: usize, bn: usize, is_default: bool) -> Candidate {
    Candidate {
        index,
        config: TunedConfig::Cpu(CpuTiles {
            block_m: bm,
            block_n: bn,
            chunk: 64,
            threads: 1,
        }),
        is_default,
        label: format!("c{index} {bm}x{bn}"),
        tile_area: (bm * bn) as u64,
    }
}

/// Returns fixed medians (ns) and check errors by candidate index, and
/// records which candidates it was asked to check and time.
#[derive(Default)]
struct Scripted {
    median: HashMap<usize, u64>,
    error: HashMap<usize, f64>,
    fail: Vec<usize>,
    sleep: Duration,
    checked: Vec<usize>,
    timed: Vec<usize>,
}

impl Timer for Scripted {
    fn check(&mut self, c: &Candidate) -> Result<f64> {
        self.checked.push(c.index);
        if self.fail.contains(&c.index) {
            return Err(RuntimeError::Invalid(format!("boom {}", c.index)));
        }
        Ok(*self.error.get(&c.index).unwrap_or(&0.0))
    }
    fn time(&mut self, c: &Candidate) -> Result<Sample> {
        self.timed.push(c.index);
        std::thread::sleep(self.sleep);
        let m = self.median[&c.index];
        Ok(Sample {
            median_ns: m,
            min_ns: m,
            max_ns: m,
            reps: 3,
        })
    }
}

fn run(cands: Vec<Candidate>, timer: &mut Scripted, opts: TuneOptions) -> tune::TuneReport {
    tune::run_tuning(cands, Vec::new(), timer, &opts, &mut |_| {})
}

#[test]
fn ties_break_on_tile_area_then_position_and_repeat_identically() {
    // 1, 2 and 3 tie on time; 2 and 3 also tie on area (32x64 = 64x32).
    let cands = vec![
        cand(0, 64, 64, true),
        cand(1, 128, 64, false),
        cand(2, 32, 64, false),
        cand(3, 64, 32, false),
    ];
    let medians: HashMap<usize, u64> = [(0, 2000), (1, 1000), (2, 1000), (3, 1000)].into();
    let mut picks = Vec::new();
    for _ in 0..3 {
        let mut t = Scripted {
            median: medians.clone(),
            ..Default::default()
        };
        let r = run(cands.clone(), &mut t, TuneOptions::default());
        picks.push(r.chosen_result().unwrap().candidate.index);
        // The ranking is the documented order: time, area, position.
        let ranked: Vec<usize> = r.ranked().iter().map(|r| r.candidate.index).collect();
        assert_eq!(ranked, vec![2, 3, 1, 0]);
        assert_eq!(r.speedup(), Some(2.0));
    }
    assert_eq!(picks, vec![2, 2, 2]);
    // Presenting the candidates in another order does not change the choice.
    let mut rev = cands.clone();
    rev.reverse();
    let mut t = Scripted {
        median: medians,
        ..Default::default()
    };
    let r = run(rev, &mut t, TuneOptions::default());
    assert_eq!(r.chosen_result().unwrap().candidate.index, 2);
    // The default went first even though it came last.
    assert_eq!(t.timed[0], 0);
}

#[test]
fn wrong_or_failing_candidates_are_never_timed_and_never_win() {
    let cands = vec![
        cand(0, 64, 64, true),
        cand(1, 32, 32, false),
        cand(2, 128, 128, false),
        cand(3, 16, 16, false),
    ];
    let mut t = Scripted {
        median: [(0, 500), (1, 100), (2, 50), (3, 10)].into(),
        error: [(2, 1e-2), (3, f64::NAN)].into(),
        fail: vec![1],
        ..Default::default()
    };
    let r = run(cands, &mut t, TuneOptions::default());
    assert_eq!(t.checked, vec![0, 1, 2, 3]);
    assert_eq!(t.timed, vec![0], "only the correct candidate is timed");
    assert_eq!(r.chosen_result().unwrap().candidate.index, 0);
    assert!(
        matches!(r.results[1].outcome, Outcome::Failed { ref error } if error.contains("boom 1"))
    );
    assert!(
        matches!(r.results[2].outcome, Outcome::WrongResult { check_error } if check_error == 1e-2)
    );
    assert!(
        matches!(r.results[3].outcome, Outcome::WrongResult { check_error } if check_error.is_nan())
    );
    assert_eq!(r.timed, 1);
}

#[test]
fn the_budget_stops_new_candidates_but_the_default_is_always_timed() {
    let cands: Vec<Candidate> = (0..5).map(|i| cand(i, 32 << (i % 3), 64, i == 3)).collect();
    let mut t = Scripted {
        median: (0..5).map(|i| (i, 100 + i as u64)).collect(),
        sleep: Duration::from_millis(30),
        ..Default::default()
    };
    let opts = TuneOptions {
        budget: Some(Duration::from_millis(1)),
        ..TuneOptions::default()
    };
    let r = run(cands, &mut t, opts);
    // The default (index 3) is timed first; the budget is spent by then.
    assert_eq!(t.timed, vec![3]);
    assert_eq!(r.count(|o| matches!(o, Outcome::SkippedBudget)), 4);
    assert_eq!(r.chosen_result().unwrap().candidate.index, 3);
}

#[test]
fn pruned_candidates_are_reported_but_never_reach_the_timer() {
    let cands = vec![cand(0, 64, 64, true), cand(2, 32, 32, false)];
    let pruned = vec![(
        cand(1, 256, 256, false),
        "shared memory: too much".to_string(),
    )];
    let mut t = Scripted {
        median: [(0, 10), (2, 20), (1, 1)].into(),
        ..Default::default()
    };
    let r = tune::run_tuning(cands, pruned, &mut t, &TuneOptions::default(), &mut |_| {});
    assert_eq!(t.checked, vec![0, 2]);
    assert_eq!(t.timed, vec![0, 2]);
    assert_eq!(r.results.len(), 3);
    assert!(
        matches!(&r.results[1].outcome, Outcome::Pruned { reason } if reason.contains("shared memory"))
    );
    assert_eq!(choose(&r.results), Some(0));
}

#[test]
fn progress_reports_tried_pruned_and_best() {
    let cands = vec![cand(0, 64, 64, true), cand(1, 32, 32, false)];
    let pruned = vec![(cand(2, 256, 256, false), "x".to_string())];
    let mut t = Scripted {
        median: [(0, 30), (1, 20)].into(),
        ..Default::default()
    };
    let mut seen = Vec::new();
    tune::run_tuning(cands, pruned, &mut t, &TuneOptions::default(), &mut |p| {
        seen.push(p.clone())
    });
    let last = seen.last().unwrap();
    assert_eq!((last.total, last.tried, last.pruned), (3, 2, 1));
    assert_eq!(last.best.as_ref().unwrap().0, "c1 32x32");
    assert!(seen
        .iter()
        .any(|p| p.current.as_deref() == Some("c0 64x64")));
}

#[test]
fn cpu_tuning_finds_a_correct_config_no_slower_than_the_default() {
    let spec = mixc_dsl::parse_str(
        "mixer t { heads = 2; head_dim = 16; score = dot(q, k); mask = causal; norm = softmax; }",
    )
    .unwrap();
    let (batch, seq) = (1, 96);
    let base = CpuConfig::default_for(&spec, seq);
    let cands = space::cpu_candidates(&spec, seq, &base);
    let n = cands.len();
    let mut timer = CpuTimer::new(
        &spec,
        base,
        batch,
        seq,
        CpuTimerOptions {
            reps: 3,
            ..CpuTimerOptions::default()
        },
    )
    .unwrap();
    let r = tune::run_tuning(
        cands,
        Vec::new(),
        &mut timer,
        &TuneOptions::default(),
        &mut |_| {},
    );
    assert_eq!(r.timed, n, "{:?}", r.results);
    let chosen = r.chosen_result().unwrap().sample().unwrap().median_ns;
    let default = r.default_result().unwrap().sample().unwrap().median_ns;
    assert!(chosen <= default);
    for x in &r.results {
        let Outcome::Timed {
            check_error,
            sample,
        } = &x.outcome
        else {
            panic!("{x:?}")
        };
        assert!(*check_error < 1e-5, "{x:?}");
        assert_eq!(sample.reps, 3);
        assert!(sample.min_ns > 0 && sample.min_ns <= sample.median_ns);
    }
}

#[test]
fn the_stored_table_keeps_the_default_row_with_its_true_rank() {
    // The default is slowest of five; a top-2 table still shows it, ranked 5th.
    let cands: Vec<Candidate> = (0..5).map(|i| cand(i, 16 << i, 64, i == 0)).collect();
    let medians: HashMap<usize, u64> = [(0, 900), (1, 100), (2, 200), (3, 300), (4, 400)].into();
    let mut t = Scripted {
        median: medians,
        ..Default::default()
    };
    let report = run(cands, &mut t, TuneOptions::default());
    let spec = mixc_dsl::parse_str("mixer m { heads = 2; head_dim = 8; mask = causal; }").unwrap();
    let key = tune::TuneKey::new(&spec, 1, 64, spec.dtype, tune::DeviceInfo::cpu());
    let entry = tune::TuneEntry::from_report(key, 1, 64, &report, 2).unwrap();
    let rows: Vec<(usize, usize, bool)> = entry
        .top
        .iter()
        .map(|r| (r.rank, (r.median_s * 1e9).round() as usize, r.is_default))
        .collect();
    assert_eq!(rows, vec![(1, 100, false), (2, 200, false), (5, 900, true)]);
}
