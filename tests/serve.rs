//! rh-serve and the chat layer on a synthetic tiny checkpoint (random
//! weights, real Qwen3 tokenizer and template): the template as
//! transformers renders it, multi-turn state reuse, one-shot runs as a
//! process, and the interactive chat through a pseudo-terminal.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};

use rh_tests::{bin, rh, run, text};
use roundhouse::chat::{ChatModel, ChatTemplate, Conversation, GenOptions, Message, StopReason};
use roundhouse::checkpoint::Checkpoint;
use roundhouse::sample::SamplingParams;

/// The synthetic tiny checkpoint (4 layers: linear and full attention),
/// written once per target dir; its content is deterministic, so reusing it
/// across runs is safe.
fn tiny() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| rh_tests::tiny_checkpoint(Path::new(env!("CARGO_TARGET_TMPDIR"))))
}

fn chat_model() -> &'static ChatModel {
    static M: OnceLock<ChatModel> = OnceLock::new();
    M.get_or_init(|| ChatModel::load(Arc::new(Checkpoint::open(tiny()).unwrap())).unwrap())
}

fn greedy(max_tokens: usize) -> GenOptions {
    GenOptions {
        sampling: SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        },
        max_tokens,
        ctx_size: 4096,
        enable_thinking: true,
    }
}

#[test]
fn template_from_the_checkpoint_renders_like_transformers() {
    let ck = Checkpoint::open(tiny()).unwrap();
    let t = ChatTemplate::load(&ck).unwrap();
    assert!(t.origin.ends_with("chat_template.jinja"), "{}", t.origin);
    let msgs = [
        Message::new("system", "Be brief."),
        Message::new("user", "Hi"),
        Message::new("assistant", "<think>\nhmm\n</think>\n\nHello!"),
        Message::new("user", "Bye"),
    ];
    assert_eq!(
        t.render(&msgs, true, true).unwrap(),
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
         <|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n\
         <|im_start|>assistant\n<think>\n"
    );
    // Without chat_template.jinja, tokenizer_config.json's copy is used.
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "tokenizer_config.json"] {
        std::fs::copy(tiny().join(f), dir.path().join(f)).unwrap();
    }
    let cfg = roundhouse::config::ModelConfig::load(&dir.path().join("config.json")).unwrap();
    struct Aux(PathBuf, roundhouse::config::ModelConfig);
    impl roundhouse::weights::WeightSource for Aux {
        fn config(&self) -> &roundhouse::config::ModelConfig {
            &self.1
        }
        fn path(&self) -> String {
            self.0.display().to_string()
        }
        fn matrix(
            &self,
            m: &str,
            _: usize,
            _: usize,
        ) -> Result<roundhouse::tensor::Matrix, roundhouse::weights::WeightError> {
            Err(roundhouse::weights::WeightError::Format(m.into()))
        }
        fn vector(
            &self,
            n: &str,
            _: &[usize],
        ) -> Result<Vec<f32>, roundhouse::weights::WeightError> {
            Err(roundhouse::weights::WeightError::Format(n.into()))
        }
        fn contains(&self, _: &str) -> bool {
            false
        }
        fn aux_file(&self, name: &str) -> Option<Vec<u8>> {
            std::fs::read(self.0.join(name)).ok()
        }
    }
    let aux = Aux(dir.path().to_path_buf(), cfg);
    let t = ChatTemplate::load(&aux).unwrap();
    assert!(t.origin.ends_with("tokenizer_config.json"), "{}", t.origin);
    assert_eq!(t.render(&msgs[..2], true, true).unwrap(), "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n");
    // Neither: ChatML.
    std::fs::remove_file(dir.path().join("tokenizer_config.json")).unwrap();
    let t = ChatTemplate::load(&aux).unwrap();
    assert_eq!(t.origin, "built-in ChatML");
    assert_eq!(
        t.render(&msgs[1..2], true, true).unwrap(),
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn second_turn_feeds_only_its_new_tokens() {
    let chat = chat_model();
    let no = AtomicBool::new(false);
    let mut conv = Conversation::new(chat, greedy(4));
    let mut streamed = 0;
    let r1 = conv.send("Hello", &no, &mut |_| streamed += 1).unwrap();
    // <|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n<think>\n
    assert_eq!(r1.stats.prompt_tokens, 11);
    assert!(r1.stats.generated_tokens <= 4, "{:?}", r1.stats);
    assert!(streamed > 0 || r1.stop == StopReason::Eos);
    let r2 = conv.send("How are you?", &no, &mut |_| {}).unwrap();
    let tail = chat
        .tokenizer
        .encode("<|im_end|>\n<|im_start|>user\nHow are you?<|im_end|>\n<|im_start|>assistant\n<think>\n")
        .unwrap();
    // The first turn's history is not fed again: only the end of the last
    // reply (its last token when cut by max_tokens), the new user turn and
    // the generation prompt.
    let pending = usize::from(r1.stop != StopReason::Eos);
    assert_eq!(
        r2.stats.prompt_tokens,
        tail.len() + pending,
        "{:?}",
        r2.stats
    );
    assert_eq!(
        r2.stats.context_tokens,
        r1.stats.context_tokens - pending + r2.stats.prompt_tokens + r2.stats.generated_tokens,
        "{:?} then {:?}",
        r1.stats,
        r2.stats
    );
    assert_eq!(conv.messages().len(), 4);

    // The state is exactly the conversation as transformers would render it
    // with the reasoning kept: the ids it consumed decode to turn 1's prompt,
    // the whole first reply, the end of that turn and turn 2's prompt.
    let fed = conv.history_ids().to_vec();
    assert_eq!(fed.len(), conv.context_used());
    let seen = chat.tokenizer.decode(&fed).unwrap();
    let turn2 =
        "<|im_end|>\n<|im_start|>user\nHow are you?<|im_end|>\n<|im_start|>assistant\n<think>\n";
    assert!(
        seen.starts_with("<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n<think>\n"),
        "{seen:?}"
    );
    assert!(seen.contains(turn2), "{seen:?}");
    // ...and turn 2's incremental prefill left the same state as one
    // prefill of all of it: the next logits agree.
    let model = &chat.model;
    let mut incremental = conv.state().clone();
    let a = model.forward(&mut incremental, &[1000]);
    let mut all = fed.clone();
    all.push(1000);
    let mut fresh = model.new_state();
    let b = model.forward(&mut fresh, &all);
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
    let err = a
        .iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(err <= 1e-3 * scale, "max |diff| {err} vs scale {scale}");
    assert!(r2.stats.ttft_ms > 0.0 && r2.stats.prefill_tps > 0.0);

    // Greedy is deterministic: a fresh conversation says the same.
    let mut again = Conversation::new(chat, greedy(4));
    let a1 = again.send("Hello", &no, &mut |_| {}).unwrap();
    assert_eq!(
        (a1.reasoning.clone(), a1.answer.clone()),
        (r1.reasoning, r1.answer)
    );

    // /reset forgets everything.
    again.reset();
    assert_eq!(again.context_used(), 0);
    assert!(again.messages().is_empty());
}

#[test]
fn cancel_flag_and_context_limits() {
    let chat = chat_model();
    let stop_now = AtomicBool::new(true);
    let mut conv = Conversation::new(chat, greedy(1000));
    let r = conv.send("Hello", &stop_now, &mut |_| {}).unwrap();
    assert!(
        r.stop == StopReason::Cancelled && r.stats.generated_tokens == 1
            || r.stop == StopReason::Eos,
        "{r:?}"
    );

    let mut small = greedy(1000);
    small.ctx_size = 16;
    let mut conv = Conversation::new(chat, small);
    let no = AtomicBool::new(false);
    let long = "trains ".repeat(40);
    let e = conv.send(&long, &no, &mut |_| {}).unwrap_err().to_string();
    assert!(e.contains("16-token context"), "{e}");
    assert!(conv.messages().is_empty() && conv.context_used() == 0);
    let r = conv.send("Hi", &no, &mut |_| {}).unwrap();
    assert!(
        r.stop == StopReason::ContextFull || r.stop == StopReason::Eos,
        "{r:?}"
    );
    assert!(r.stats.context_tokens <= 16, "{:?}", r.stats);
}

#[test]
fn one_shot_json_and_plain() {
    let o = run(rh("rh-serve").arg(tiny()).args([
        "--prompt",
        "Hello",
        "--json",
        "--max-tokens",
        "6",
        "--temperature",
        "0",
    ]));
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value =
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&o)));
    for k in ["reasoning", "answer"] {
        assert!(v[k].is_string(), "{k}: {v}");
    }
    assert_eq!(v["prompt_tokens"], 11, "{v}");
    let g = v["generated_tokens"].as_u64().unwrap();
    assert!((1..=6).contains(&g), "{v}");
    for k in ["ttft_ms", "prefill_tps", "decode_tps"] {
        assert!(v[k].as_f64().unwrap() >= 0.0, "{k}: {v}");
    }
    assert!(v["ttft_ms"].as_f64().unwrap() > 0.0, "{v}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("loaded"),
        "{}",
        text(&o)
    );

    // The prompt on stdin, plain output, same greedy reply.
    let mut child = Command::new(bin("rh-serve"))
        .arg(tiny())
        .args(["--max-tokens", "6", "--temperature", "0", "--thinking"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"Hello\n").unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    let want = format!(
        "{}{}",
        v["reasoning"].as_str().unwrap(),
        v["answer"].as_str().unwrap()
    );
    let got: String = out.split_whitespace().collect();
    let want: String = want.split_whitespace().collect();
    assert_eq!(got, want, "{}", text(&o));
    assert!(!out.contains('\x1b'), "no colours when not a tty: {out:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("generated"),
        "{}",
        text(&o)
    );
}

#[test]
fn bad_input_is_a_clear_one_line_error() {
    // Missing tokenizer: names the directory.
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(tiny()).unwrap() {
        let e = e.unwrap();
        let name = e.file_name();
        if name != "tokenizer.json" {
            std::os::unix::fs::symlink(e.path(), dir.path().join(&name)).unwrap();
        }
    }
    let o = run(rh("rh-serve").arg(dir.path()).args(["--prompt", "Hi"]));
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("tokenizer.json") && err.contains(&*dir.path().to_string_lossy()),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    // A prompt longer than the context.
    let long = "word ".repeat(300);
    let o = run(rh("rh-serve")
        .arg(tiny())
        .args(["--prompt", &long, "--ctx-size", "64", "-q"]));
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("64-token context"),
        "{}",
        text(&o)
    );

    // No model directory.
    let o = run(rh("rh-serve")
        .arg(dir.path().join("nope"))
        .args(["--prompt", "Hi"]));
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("nope"),
        "{}",
        text(&o)
    );

    // --json with nothing to answer (stdin is not a terminal and empty).
    let o = run(rh("rh-serve")
        .arg(tiny())
        .arg("--json")
        .stdin(Stdio::null()));
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
}

#[test]
fn interactive_chat_through_a_pty() {
    let mut cmd = Command::new(bin("rh-serve"));
    cmd.arg(tiny())
        .args([
            "--temperature",
            "0",
            "--max-tokens",
            "5",
            "--ctx-size",
            "100000",
        ])
        .env_remove("RUST_LOG")
        .env("TERM", "xterm");
    let mut p = rexpect::session::spawn_command(cmd, Some(120_000)).unwrap();
    p.exp_string("/help").unwrap();
    p.exp_string("> ").unwrap();

    // A prompt and a streamed reply; reasoning hidden behind a counter.
    p.send_line("Hello").unwrap();
    p.exp_string("thinking... (").unwrap();
    let (_, first) = p
        .exp_regex(r"prompt (\d+) tok, generated (\d+) tok")
        .unwrap();
    assert!(first.contains("prompt 11 tok"), "{first}");
    p.exp_string("> ").unwrap();

    // A second turn does not re-read the first.
    p.send_line("Tell me more").unwrap();
    let (_, second) = p.exp_regex(r"prompt (\d+) tok").unwrap();
    let n: usize = second
        .trim_start_matches("prompt ")
        .trim_end_matches(" tok")
        .parse()
        .unwrap();
    assert!(n < 30, "second turn fed {n} tokens");
    p.exp_string("> ").unwrap();

    // Multi-line input with a trailing backslash.
    p.send_line("/system You are\\").unwrap();
    p.exp_string("... ").unwrap();
    p.send_line("a train.").unwrap();
    p.exp_string("system prompt set").unwrap();
    p.exp_string("> ").unwrap();

    // Ctrl-C mid-answer stops it and the chat goes on.
    p.send_line("/thinking on").unwrap();
    p.exp_string("reasoning shown").unwrap();
    p.exp_string("> ").unwrap();
    drop(p);
    let mut cmd = Command::new(bin("rh-serve"));
    cmd.arg(tiny())
        .args([
            "--temperature",
            "0",
            "--max-tokens",
            "100000",
            "--ctx-size",
            "100000",
            "--thinking",
        ])
        .env_remove("RUST_LOG")
        .env("TERM", "xterm");
    let mut p = rexpect::session::spawn_command(cmd, Some(120_000)).unwrap();
    p.exp_string("> ").unwrap();
    p.send_line("Write a long story").unwrap();
    // Streamed reasoning text arrives (dimmed on a terminal).
    p.exp_string("\x1b[2m").unwrap();
    p.send_control('c').unwrap();
    p.exp_string("(stopped)").unwrap();
    p.exp_string("> ").unwrap();
    p.send_line("/stats").unwrap();
    p.exp_string("context").unwrap();
    p.exp_string("> ").unwrap();
    p.send_line("/reset").unwrap();
    p.exp_string("conversation reset").unwrap();
    p.exp_string("> ").unwrap();
    p.send_line("/stats").unwrap();
    p.exp_string("context 0 of").unwrap();
    p.exp_string("> ").unwrap();
    p.send_line("/exit").unwrap();
    p.exp_eof().unwrap();
    let status = p.process().wait().unwrap();
    assert!(format!("{status:?}").contains(", 0)"), "{status:?}");

    // Ctrl-D at the prompt quits cleanly too.
    let mut cmd = Command::new(bin("rh-serve"));
    cmd.arg(tiny()).env_remove("RUST_LOG").env("TERM", "xterm");
    let mut p = rexpect::session::spawn_command(cmd, Some(120_000)).unwrap();
    p.exp_string("> ").unwrap();
    p.send_control('d').unwrap();
    p.exp_eof().unwrap();
    let status = p.process().wait().unwrap();
    assert!(format!("{status:?}").contains(", 0)"), "{status:?}");
}

#[test]
fn bad_sampling_and_thread_flags_are_usage_errors_before_loading() {
    for (flags, needle) in [
        (&["--temperature", "nan"][..], "temperature NaN"),
        (&["--top-p", "inf"][..], "top_p"),
        (&["--min-p=-0.5"][..], "min_p"),
        (&["--threads", "100000"][..], "--threads 100000"),
    ] {
        let o = run(rh("rh-serve")
            .arg(tiny())
            .args(["--prompt", "Hi"])
            .args(flags));
        assert_eq!(o.status.code(), Some(2), "{flags:?}: {}", text(&o));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(needle), "{flags:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
    let o = run(rh("rh-bench").arg(tiny()).args(["-t", "0"]));
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
}
