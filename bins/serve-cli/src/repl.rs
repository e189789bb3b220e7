//! The interactive chat: line editing and history (rustyline), multi-line
//! input with a trailing `\`, streamed answers, Ctrl-C that stops the
//! current answer, and the slash commands.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use roundhouse::chat::{ChatError, Conversation, Event, StopReason, TurnStats};
use roundhouse::cli::CliError;
use rustyline::error::ReadlineError;

const HELP: &str = "commands: /help, /reset (forget the conversation), /system TEXT (set the system prompt and reset; /system alone clears it), /thinking on|off (show the reasoning), /stats (last answer's figures), /exit; end a line with \\ to continue it; Ctrl-C stops an answer, Ctrl-D quits";

/// `s` dimmed when `tty`.
pub fn dim(s: &str, tty: bool) -> String {
    if tty {
        format!("\x1b[2m{s}\x1b[0m")
    } else {
        s.to_string()
    }
}

/// The figures printed after each answer.
pub fn stats_line(s: &TurnStats, stop: StopReason) -> String {
    let why = match stop {
        StopReason::Eos => "",
        StopReason::MaxTokens => ", stopped at --max-tokens",
        StopReason::ContextFull => ", context full (/reset or a larger --ctx-size)",
        StopReason::Cancelled => ", stopped",
    };
    // Under a memory budget: how the expert cache did this turn.
    let cache = s.expert_cache.map_or(String::new(), |c| {
        format!(
            ", expert cache {:.0}% hits, {} read/tok",
            100.0 * c.hit_rate,
            roundhouse::cli::human_bytes(c.read_bytes_per_token as u64)
        )
    });
    format!(
        "[prompt {} tok, generated {} tok, ttft {:.0} ms, prefill {:.1} tok/s, decode {:.1} tok/s, context {} tok{cache}{why}]",
        s.prompt_tokens, s.generated_tokens, s.ttft_ms, s.prefill_tps, s.decode_tps, s.context_tokens
    )
}

/// Reads one (possibly multi-line) input; `None` at Ctrl-D.
fn read_input(rl: &mut rustyline::DefaultEditor) -> Result<Option<String>, CliError> {
    let mut text = String::new();
    let mut prompt = "> ";
    loop {
        match rl.readline(prompt) {
            Ok(line) => {
                if let Some(head) = line.strip_suffix('\\') {
                    text.push_str(head);
                    text.push('\n');
                    prompt = "... ";
                    continue;
                }
                text.push_str(&line);
                if !text.trim().is_empty() {
                    let _ = rl.add_history_entry(text.as_str());
                }
                return Ok(Some(text));
            }
            // Ctrl-C at the prompt drops the line being typed.
            Err(ReadlineError::Interrupted) => {
                text.clear();
                prompt = "> ";
            }
            Err(ReadlineError::Eof) => return Ok(None),
            Err(e) => return Err(CliError::failure(format!("reading input: {e}"))),
        }
    }
}

/// Runs the chat until /exit or Ctrl-D.
pub fn run(conv: &mut Conversation<'_>, mut show_thinking: bool) -> Result<(), CliError> {
    let cancel = Arc::new(AtomicBool::new(false));
    {
        let c = cancel.clone();
        ctrlc::set_handler(move || c.store(true, Ordering::SeqCst))
            .map_err(|e| CliError::failure(format!("installing the Ctrl-C handler: {e}")))?;
    }
    let mut rl =
        rustyline::DefaultEditor::new().map_err(|e| CliError::failure(format!("terminal: {e}")))?;
    let tty = std::io::stdout().is_terminal();
    eprintln!("{HELP}");
    while let Some(input) = read_input(&mut rl)? {
        let line = input.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(cmd) = line.strip_prefix('/') {
            if !command(conv, cmd, &mut show_thinking) {
                break;
            }
            continue;
        }
        cancel.store(false, Ordering::SeqCst);
        turn(conv, line, &cancel, show_thinking, tty)?;
        cancel.store(false, Ordering::SeqCst);
    }
    Ok(())
}

/// Runs one `/command` (without its slash); false for `/exit`.
fn command(conv: &mut Conversation<'_>, cmd: &str, show_thinking: &mut bool) -> bool {
    let (name, rest) = cmd.split_once(char::is_whitespace).unwrap_or((cmd, ""));
    let rest = rest.trim();
    match name {
        "exit" | "quit" => return false,
        "reset" => {
            conv.reset();
            println!("(conversation reset)");
        }
        "system" => {
            conv.set_system(Some(rest.to_string()));
            if rest.is_empty() {
                println!("(system prompt cleared; conversation reset)");
            } else {
                println!("(system prompt set; conversation reset)");
            }
        }
        "thinking" => match rest {
            "on" => {
                *show_thinking = true;
                println!("(reasoning shown)");
            }
            "off" => {
                *show_thinking = false;
                println!("(reasoning hidden)");
            }
            _ => println!("usage: /thinking on|off"),
        },
        "stats" => match conv.last_stats() {
            Some(s) => println!(
                "{} (context {} of {} tokens)",
                stats_line(s, StopReason::Eos),
                conv.context_used(),
                conv.options().ctx_size
            ),
            None => println!("(no answer yet; context {} tokens)", conv.context_used()),
        },
        "help" => println!("{HELP}"),
        _ => println!("unknown command /{name}; /help lists them"),
    }
    true
}

/// Answers one line: streams the reasoning (dimmed, or a counter when
/// hidden) and the answer, then the stats line. A prompt too long for the
/// context is reported and the chat goes on; other errors end it.
fn turn(
    conv: &mut Conversation<'_>,
    line: &str,
    cancel: &AtomicBool,
    show_thinking: bool,
    tty: bool,
) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    let mut thinking_shown = false;
    let mut on_event = |e: Event<'_>| match e {
        Event::Reasoning(s) if show_thinking => {
            let _ = write!(out, "{}", dim(s, tty));
            let _ = out.flush();
        }
        Event::Thinking { tokens } if !show_thinking && tty => {
            thinking_shown = true;
            let _ = write!(
                out,
                "\r{}",
                dim(&format!("thinking... ({tokens} tokens)"), tty)
            );
            let _ = out.flush();
        }
        Event::ReasoningEnd { tokens } => {
            if show_thinking {
                let _ = writeln!(out, "\n");
            } else {
                let _ = writeln!(
                    out,
                    "\r{}",
                    dim(&format!("thinking... ({tokens} tokens)"), tty)
                );
            }
            thinking_shown = false;
        }
        Event::Answer(s) => {
            let _ = write!(out, "{s}");
            let _ = out.flush();
        }
        _ => {}
    };
    let r = conv.send(line, cancel, &mut on_event);
    if thinking_shown {
        let _ = writeln!(out);
    }
    match r {
        Ok(r) => {
            if r.stop == StopReason::Cancelled {
                let _ = write!(out, "\n(stopped)");
            }
            let _ = writeln!(out);
            let _ = writeln!(out, "{}", dim(&stats_line(&r.stats, r.stop), tty));
        }
        Err(e @ ChatError::PromptTooLong { .. }) => {
            let _ = writeln!(out, "error: {e}");
        }
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use roundhouse::model::experts::CacheUse;

    #[test]
    fn stats_line_shows_the_expert_cache_only_under_a_budget() {
        let mut s = TurnStats {
            prompt_tokens: 11,
            generated_tokens: 6,
            decode_tps: 4.25,
            ..TurnStats::default()
        };
        let plain = stats_line(&s, StopReason::MaxTokens);
        assert!(!plain.contains("expert cache"), "{plain}");
        assert!(plain.ends_with(", stopped at --max-tokens]"), "{plain}");
        s.expert_cache = Some(CacheUse {
            hit_rate: 0.434,
            read_bytes_per_token: 70.5 * (1u64 << 20) as f64,
            wait_ms_per_token: 12.0,
        });
        let paged = stats_line(&s, StopReason::MaxTokens);
        assert!(
            paged.contains(", expert cache 43% hits, 70.50 MiB read/tok, stopped at --max-tokens]"),
            "{paged}"
        );
    }
}
