//! Stopping a run on an interrupt (Ctrl-C, or SIGTERM from a scheduler): the binary's signal
//! handler sets a flag that the training loop polls between micro-batches; the step under way
//! is abandoned (its gradients dropped, the optimizer untouched), a checkpoint of the last step
//! done is saved as any other, and the run ends with [`Error::Interrupted`](crate::Error). A
//! second interrupt stops the process at once: checkpoints are written atomically, so at worst
//! the one being saved is missing. The binary then prints the command that goes on.

/// The exit status of a run stopped by an interrupt (128 + SIGINT, as shells report it).
pub const EXIT_STATUS: u8 = 130;

/// `arg` quoted for a POSIX shell where it needs it.
pub fn shell_quote(arg: &str) -> String {
    let plain = !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=,+@%".contains(c));
    if plain {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

/// `args` (the program first) with `--resume` and `--overwrite` left out and `flag` added at
/// the end, quoted for a shell.
fn with_flag(args: &[String], flag: &str) -> String {
    args.iter()
        .map(String::as_str)
        .filter(|a| *a != "--resume" && *a != "--overwrite")
        .chain([flag])
        .map(shell_quote)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The command that continues the run that `args` (the program first) started: the same
/// arguments with `--resume` (and without `--overwrite`).
pub fn resume_command(args: &[String]) -> String {
    with_flag(args, "--resume")
}

/// The command that starts the run of `args` again when no step of it was saved: the same
/// arguments with `--overwrite` (its folder holds the settings and metrics of the stopped run).
pub fn restart_command(args: &[String]) -> String {
    with_flag(args, "--overwrite")
}

/// The command that goes on after an interrupt: [`resume_command`] when a checkpoint of the run
/// exists (`saved`), else [`restart_command`].
pub fn next_command(args: &[String], saved: bool) -> String {
    if saved {
        resume_command(args)
    } else {
        restart_command(args)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &[&str]) -> Vec<String> {
        s.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn resume_command_repeats_the_arguments_with_resume() {
        let a = args(&[
            "target/release/mixlora",
            "train",
            "--overwrite",
            "--out",
            "runs/my run",
            "--data",
            "it's.json",
            "--lr=2e-4",
        ]);
        assert_eq!(
            resume_command(&a),
            r"target/release/mixlora train --out 'runs/my run' --data 'it'\''s.json' --lr=2e-4 --resume"
        );
        assert_eq!(
            resume_command(&args(&["mixlora", "train", "--resume"])),
            "mixlora train --resume",
            "--resume once"
        );
        assert_eq!(
            restart_command(&args(&["mixlora", "train", "--resume"])),
            "mixlora train --overwrite"
        );
        assert_eq!(shell_quote(""), "''");
        assert_eq!(
            next_command(&args(&["mixlora", "train"]), true),
            "mixlora train --resume"
        );
        assert_eq!(
            next_command(&args(&["mixlora", "train"]), false),
            "mixlora train --overwrite"
        );
    }
}
