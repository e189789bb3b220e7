//! The expert cache on a tiny repacked model: identical logits with and
//! without a budget (demand reads, read-ahead and eviction included),
//! eviction by use, usage counts that persist and survive damage, and a
//! budget too small to run.

use super::*;
use crate::cache::repack;
use crate::model::Model;
use std::path::{Path, PathBuf};

/// A tiny skewed model (2 layers, 8 experts, top-2) repacked into `dir/cache`.
fn tiny_cache(dir: &Path) -> PathBuf {
    tiny_cache_layers(dir, 2)
}

/// [`tiny_cache`] with `layers` layers.
fn tiny_cache_layers(dir: &Path, layers: usize) -> PathBuf {
    let (ck, cache) = (dir.join("checkpoint"), dir.join("cache"));
    std::fs::create_dir_all(&ck).unwrap();
    crate::synthetic::write_test_checkpoint("tiny,zipf=0.6", layers, 5, &ck);
    repack(&crate::cache::write::test_options(&ck, &cache, dir)).unwrap();
    cache
}

/// The smallest budget whose plan holds exactly `slots` experts.
fn budget_for(cache: &Path, slots: usize) -> u64 {
    let c = Cache::open(cache).unwrap();
    let b = budget_for_slots(&c, slots, 0);
    assert_eq!(plan_budget(&c, b, 0).slots, slots);
    b
}

fn paged(cache: &Path, slots: usize, usage: Option<PathBuf>, predict: bool) -> Model {
    let mut opts = PagerOptions::new(budget_for(cache, slots));
    opts.usage_file = usage;
    opts.predict = predict;
    opts.io_threads = 3;
    let (w, plan) = open_with_budget(cache, &opts).unwrap();
    assert_eq!(plan.unwrap().slots, slots);
    Model::load(w).unwrap()
}

/// Prefill, then decode step by step; every step's logits.
fn run(model: &Model) -> Vec<Vec<f32>> {
    let mut st = model.new_state();
    let mut out = vec![model.forward(&mut st, &[9, 400, 3, 77, 1200])];
    for id in [5u32, 6, 900, 31, 2, 8, 15, 4000] {
        out.push(model.forward(&mut st, &[id]));
    }
    out
}

/// [`run`] on `cache` mapped whole (no budget): what paging must reproduce.
fn mapped_run(cache: &Path) -> Vec<Vec<f32>> {
    run(&Model::load(crate::open::open_weights(cache).unwrap()).unwrap())
}

/// The model of `cache` under the budget and options `opts`.
fn paged_with(cache: &Path, opts: &PagerOptions) -> Model {
    let (w, _) = open_with_budget(cache, opts).unwrap();
    Model::load(w).unwrap()
}

#[test]
fn paged_logits_equal_mapped_logits_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tiny_cache(tmp.path());
    let plain = mapped_run(&cache);
    // 8 slots for 16 experts: evictions, misses and (with prediction)
    // read-ahead all happen; the numbers must not change.
    for predict in [false, true] {
        let model = paged(&cache, 8, None, predict);
        assert_eq!(run(&model), plain, "predict = {predict}");
        let s = pager_of(&**model.weights()).unwrap().stats();
        assert!(s.misses > 0 && s.hits > 0, "{s:?}");
        assert!(s.evictions > 0, "the cache never filled: {s:?}");
        assert_eq!(s.read_errors, 0);
        if predict {
            assert!(s.predicted > 0, "{s:?}");
        }
    }
}

#[test]
fn heap_and_huge_page_buffers_give_the_same_logits() {
    // The buffers are slots of one huge-page mapping where the kernel
    // offers transparent huge pages, else one heap allocation each; the
    // numbers must not depend on which.
    let tmp = tempfile::tempdir().unwrap();
    let cache = tiny_cache(tmp.path());
    let plain = mapped_run(&cache);
    for huge in [false, true] {
        let mut opts = PagerOptions::new(budget_for(&cache, 8));
        opts.huge_buffers = huge;
        let model = paged_with(&cache, &opts);
        assert_eq!(run(&model), plain, "huge = {huge}");
        let pager = pager_of(&**model.weights()).unwrap();
        let expect = huge && crate::tensor::huge_pages_available();
        assert_eq!(pager.huge_buffers(), expect);
        let s = pager.stats();
        assert!(s.evictions > 0 && s.read_errors == 0, "{s:?}");
    }
}

#[test]
fn predicting_two_layers_ahead_with_one_read_ahead_thread_keeps_the_logits() {
    // Three layers, so layer 0 predicts layer 2 too; one read-ahead read
    // in flight at a time, so guesses queue up and are promoted or
    // cancelled when their layer routes.
    let tmp = tempfile::tempdir().unwrap();
    let cache = tiny_cache_layers(tmp.path(), 3);
    let plain = mapped_run(&cache);
    let mut opts = PagerOptions::new(budget_for(&cache, 8));
    opts.io_threads = 2;
    opts.predict_depth = 2;
    opts.ahead_inflight = 1;
    let model = paged_with(&cache, &opts);
    assert_eq!(run(&model), plain);
    let s = pager_of(&**model.weights()).unwrap().stats();
    assert!(s.predicted > 0 && s.predicted2 > 0, "{s:?}");
    assert!(s.routes > 0 && s.routes_waited <= s.routes, "{s:?}");
    assert_eq!(s.read_errors, 0, "{s:?}");
}

#[test]
fn eviction_keeps_the_experts_used_most() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tiny_cache(tmp.path());
    let model = paged(&cache, 8, None, false);
    let p = pager_of(&**model.weights()).unwrap();
    let hold = |l: usize, es: &[usize]| {
        for f in p.fetch(l, es) {
            assert!(f.wait(&p).is_some());
        }
    };
    // Expert 0 of layer 0 is used often; then 8 other experts pass once
    // each, more than the 7 free slots.
    for _ in 0..5 {
        hold(0, &[0]);
    }
    for e in 1..8 {
        hold(0, &[e]);
    }
    hold(1, &[0, 1]);
    let before = p.stats();
    assert!(before.evictions >= 1, "{before:?}");
    hold(0, &[0]);
    let after = p.stats().since(&before);
    assert_eq!((after.hits, after.misses), (1, 0), "expert 0 was evicted");
    // The least used, least recently: layer 0's expert 1 went first.
    hold(0, &[1]);
    assert_eq!(p.stats().since(&before).misses, 1);
}

#[test]
fn usage_counts_persist_and_a_damaged_file_starts_fresh() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tiny_cache(tmp.path());
    let file = tmp.path().join(usage::USAGE_FILE);
    let counts = {
        let model = paged(&cache, 8, Some(file.clone()), false);
        run(&model);
        let p = pager_of(&**model.weights()).unwrap();
        p.usage_counts()
    };
    // Dropped with the model: saved.
    assert!(file.is_file());
    assert!(counts.iter().flatten().sum::<u64>() > 0);
    let model = paged(&cache, 8, Some(file.clone()), false);
    let p = pager_of(&**model.weights()).unwrap().clone();
    assert_eq!(p.usage_counts(), counts);
    // The hot set is read ahead at load.
    assert!(p.stats().preloaded > 0);
    drop(model);
    drop(p);
    for junk in [
        &b"{not json"[..],
        b"",
        b"{\"format\":1,\"cache\":\"other\",\"counts\":[]}",
    ] {
        std::fs::write(&file, junk).unwrap();
        let model = paged(&cache, 8, Some(file.clone()), false);
        let p = pager_of(&**model.weights()).unwrap();
        assert_eq!(p.usage_counts().iter().flatten().sum::<u64>(), 0);
        assert_eq!(p.stats().ahead_issued, 0);
    }
}

#[test]
fn a_budget_below_the_resident_weights_is_a_usage_error() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tiny_cache(tmp.path());
    let e = match open_with_budget(&cache, &PagerOptions::new(64 << 20)) {
        Err(e) => e,
        Ok(_) => panic!("64 MiB accepted"),
    };
    assert_eq!(e.exit(), Exit::Usage);
    assert!(e.to_string().contains("needs at least"), "{e}");
    // A budget holding everything pages nothing.
    let (_, plan) = open_with_budget(&cache, &PagerOptions::new(64 << 30)).unwrap();
    assert!(plan.is_none());
}

/// The embedding (one row a token) is not part of what a budget keeps
/// resident: the plan counts every other non-expert byte, and no more.
#[test]
fn the_embedding_is_read_by_rows_not_kept_resident() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache::open(&tiny_cache(tmp.path())).unwrap();
    let bytes_of = |pred: &dyn Fn(&str) -> bool| -> u64 {
        let tensors = cache.index().tensors.iter();
        tensors
            .filter(|t| pred(&t.name))
            .flat_map(|t| t.spans())
            .map(|s| s.len)
            .sum()
    };
    let embed = bytes_of(&|n| n.starts_with("model.embed_tokens"));
    let experts = bytes_of(&|n| expert_of(n).is_some());
    assert!(embed > 0 && experts > 0);
    assert!(read_by_rows(&cache, "model.embed_tokens.weight"));
    assert!(!read_by_rows(&cache, "lm_head.weight"));
    let plan = plan_budget(&cache, 1 << 30, 0);
    assert_eq!(plan.resident_bytes, cache.data_bytes() - experts - embed);
}

/// What a budget sets aside for the caller's sequences is what their
/// states hold at that context, and it comes out of the expert cache.
#[test]
fn sequences_at_full_context_come_out_of_the_budget() {
    let tmp = tempfile::tempdir().unwrap();
    // Four layers: three DeltaNet, one full attention.
    let dir = tiny_cache_layers(tmp.path(), 4);
    let model = Model::load(crate::open::open_weights(&dir).unwrap()).unwrap();
    let mut st = model.new_state();
    let ids: Vec<u32> = (0..40).map(|i| 3 + 7 * i).collect();
    model.forward(&mut st, &ids);
    assert_eq!(model.config().state_bytes(40), st.bytes() as u64);
    assert!(model.config().state_bytes(41) > model.config().state_bytes(40));

    let b = budget_for(&dir, 28);
    let mut opts = PagerOptions::new(b);
    opts.sequences = 1;
    opts.context_tokens = 40;
    opts.other_bytes = 1000;
    // The context rounded up to the KV caches' growth step.
    let held = model
        .config()
        .state_bytes(crate::model::attention::KV_GROW_TOKENS)
        + 1000;
    let cache = Cache::open(&dir).unwrap();
    assert_eq!(reserved_bytes(cache.config(), &opts), held);
    let (_, plan) = open_with_budget(&dir, &opts).unwrap();
    let plan = plan.unwrap();
    assert_eq!(plan.reserved_bytes, held);
    assert_eq!(plan.slots, plan_budget(&cache, b, held).slots);
    assert!(plan.slots < 28, "{plan:?}");
    // Too many sequences for the budget: a usage error that says what to lower.
    opts.sequences = 1 << 20;
    let e = match open_with_budget(&dir, &opts) {
        Err(e) => e,
        Ok(_) => panic!("a million sequences accepted"),
    };
    assert_eq!(e.exit(), Exit::Usage);
    assert!(e.to_string().contains("--parallel"), "{e}");
}

#[test]
fn sizes_parse() {
    assert_eq!(parse_size("24G").unwrap(), 24 << 30);
    assert_eq!(parse_size("1536MiB").unwrap(), 1536 << 20);
    assert_eq!(parse_size("1.5g").unwrap(), 3 << 29);
    assert_eq!(parse_size("1000").unwrap(), 1000);
    for bad in ["", "G", "12Q", "-1G", "0"] {
        assert!(parse_size(bad).is_err(), "{bad}");
    }
}

#[test]
fn skewed_synthetic_routing_prefers_low_ranks() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tiny_cache(tmp.path());
    let model = paged(&cache, 10, None, false);
    let mut st = model.new_state();
    let ids: Vec<u32> = (0..64).map(|i| (i * 2371 % 150_000 + 1) as u32).collect();
    for &id in &ids {
        model.forward(&mut st, &[id]);
    }
    let p = pager_of(&**model.weights()).unwrap();
    for (l, c) in p.usage_counts().iter().enumerate() {
        let mut c = c.clone();
        c.sort_unstable_by(|a, b| b.cmp(a));
        let total: u64 = c.iter().sum();
        // Uniform would give the top 2 of 8 experts a quarter.
        assert!(
            (c[0] + c[1]) as f64 > 0.35 * total as f64,
            "layer {l}: {c:?}"
        );
    }
}

#[test]
fn read_ahead_is_judged_only_after_its_trial_and_stops_under_a_quarter_used() {
    assert_eq!(read_ahead_pays(0, AHEAD_TRIAL - 1), None);
    assert_eq!(
        read_ahead_pays(AHEAD_TRIAL / 4, AHEAD_TRIAL - AHEAD_TRIAL / 4),
        Some(true)
    );
    assert_eq!(
        read_ahead_pays(AHEAD_TRIAL / 4 - 1, AHEAD_TRIAL - AHEAD_TRIAL / 4 + 1),
        Some(false)
    );
    assert_eq!(read_ahead_pays(350, 380), Some(true));
}

#[test]
fn buffers_are_prepared_ahead_after_the_first_forward_pass() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tiny_cache(tmp.path());
    // 8 slots for 16 experts; one token uses 4 (2 layers, top-2), so the
    // prefault thread has buffers left to prepare.
    let model = paged(&cache, 8, None, false);
    let pager = pager_of(&**model.weights()).unwrap();
    assert_eq!(
        pager.lock().allocated,
        0,
        "nothing allocated before a forward pass"
    );
    let mut st = model.new_state();
    model.forward(&mut st, &[9]);
    let t0 = Instant::now();
    let prepared = || {
        let resident = pager.stats().resident as usize;
        let st = pager.lock();
        st.allocated == 8 && st.free.len() + resident == 8
    };
    while !prepared() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "{:?}",
            pager.stats()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(pager.stats().prefaulted >= 1, "{:?}", pager.stats());
}
