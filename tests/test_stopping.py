"""Signals that stop a run: where they take effect, on one process (two ranks: test_distributed.py)."""

import os
import signal
import threading

import pytest

from spin_fast import stopping


def send(signum: int) -> None:
    os.kill(os.getpid(), signum)  # Python runs the handler in the main thread before the next line


def test_away_from_safe_points_a_signal_stops_at_once_and_the_old_handler_comes_back():
    """Before the first safe point nothing was done to save or lose (a launcher may be ending this rank after
    another failed as it started); after one, the work since the last saved point is redone."""
    before = signal.getsignal(signal.SIGTERM)
    with stopping.signals_handled():
        with pytest.raises(stopping.Stopped) as early:
            send(signal.SIGTERM)
    assert not early.value.agreed and not early.value.begun and early.value.exit_status == 143
    assert str(early.value) == "stopped by SIGTERM before any work"
    with stopping.signals_handled():
        with stopping.safe_points("the test's loop"):
            assert stopping.reached() == 0
        with pytest.raises(stopping.Stopped) as stopped:
            send(signal.SIGTERM)
    assert not stopped.value.agreed and stopped.value.begun and stopped.value.exit_status == 143
    assert "stopped by SIGTERM while no safe point was near" in str(stopped.value)
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize("world_size", ["1", "2"])
def test_a_stop_before_any_work_points_to_another_ranks_error_only_where_there_are_other_ranks(
        monkeypatch, capsys, world_size):
    """Launched with several ranks, the signal may be the launcher's after another rank failed: its error says why.
    One process has no other rank: its stop says only that the same command resumes the run."""
    from spin_fast import cli

    monkeypatch.setenv("WORLD_SIZE", world_size)
    assert cli.report_stop(stopping.Stopped(signal.SIGTERM, "before any work", agreed=False, begun=False)) == 143
    said = capsys.readouterr().err
    assert said.startswith("spin-fast: stopped by SIGTERM before any work; ")
    assert ("if another rank failed, its error says why; else " in said) == (world_size == "2")
    assert said.rstrip().endswith("the same command resumes the run")


def test_between_safe_points_a_signal_waits_for_the_next_one_and_a_second_stops_at_once():
    with stopping.signals_handled(), pytest.raises(stopping.Stopped, match="stopped by SIGTERM at once"):
        with stopping.safe_points("the test's loop"):
            assert stopping.reached() == 0
            send(signal.SIGUSR1)
            assert stopping.reached() == signal.SIGUSR1  # recorded, not raised
            send(signal.SIGTERM)


def test_one_signal_delivered_twice_is_one_signal_and_a_later_repeat_a_second(monkeypatch):
    """Slurm's `--signal=USR1@600` reaches every process of the job step, ranks included, and torchrun passes its own
    copy on a few ms later: the copy must not stop the rank at once, unagreed, without the checkpoint the warning is
    for. The same signal again after DUPLICATE_SECONDS is a second one."""
    with stopping.signals_handled():
        with pytest.raises(stopping.Stopped, match="stopped by SIGUSR1 at the end of the test's loop") as stopped:
            with stopping.safe_points("the test's loop"):
                send(signal.SIGUSR1)  # Slurm's
                send(signal.SIGUSR1)  # torchrun's copy of it
                assert stopping.reached() == signal.SIGUSR1
        assert stopped.value.agreed
    monkeypatch.setattr(stopping, "DUPLICATE_SECONDS", 0.0)
    with stopping.signals_handled(), pytest.raises(stopping.Stopped, match="stopped by SIGUSR1 at once"):
        with stopping.safe_points("the test's loop"):
            send(signal.SIGUSR1)
            send(signal.SIGUSR1)


def test_a_signal_after_the_last_safe_point_stops_at_the_end_of_the_block():
    with stopping.signals_handled():
        with pytest.raises(stopping.Stopped, match="stopped by SIGUSR1 at the end of the test's loop") as stopped:
            with stopping.safe_points("the test's loop"):
                send(signal.SIGUSR1)
        assert stopped.value.agreed


def test_without_handlers_the_safe_points_find_no_signal():
    """Code that uses the Trainer without the command's handlers (bench/, a user's script) runs as before."""
    with stopping.safe_points("a loop"):
        assert stopping.reached() == 0


def test_a_signal_as_a_block_reaches_its_last_point_waits_for_it(monkeypatch):
    """A signal that arrives as a rank reaches the block's last safe point (while the ranks agree there) stops it
    there with the others, agreed, instead of at once and alone while they wait for it."""
    agree = stopping.reached

    def signalled_while_agreeing():
        send(signal.SIGTERM)
        return agree()

    monkeypatch.setattr(stopping, "reached", signalled_while_agreeing)
    with stopping.signals_handled(), pytest.raises(stopping.Stopped) as stop:
        with stopping.safe_points("the work"):
            pass
    assert stop.value.agreed and str(stop.value) == "stopped by SIGTERM at the end of the work"


@pytest.mark.parametrize("own_signal", [True, False])
def test_a_signal_in_the_cleanup_after_a_stop_at_a_safe_point_says_the_work_is_saved(monkeypatch, own_signal):
    """After the ranks stopped at a safe point, its work saved, a signal during the cleanup (the engine's shutdown)
    ends the run at once; it must not say that work is redone. Without a signal of its own, the rank stopped on
    another rank's (the collective's answer): the cleanup's signal is its first."""
    if not own_signal:
        monkeypatch.setattr(stopping, "reached", lambda *args: signal.SIGTERM)
    with stopping.signals_handled(), pytest.raises(stopping.Stopped) as stop:
        try:
            with stopping.safe_points("the work"):
                if own_signal:
                    send(signal.SIGTERM)
        finally:  # the cleanup on the way up
            send(signal.SIGINT)
    assert stop.value.exit_status == 128 + signal.SIGINT
    assert "redone" not in str(stop.value) and "its work is saved" in str(stop.value), str(stop.value)


def test_an_error_on_its_way_up_when_the_signal_came_is_the_runs_end_and_one_handled_before_is_not():
    """A launcher's SIGTERM to the other ranks after one failed arrives while their error unwinds: that error came
    first (the command reports it, test_selfplay.py). An error handled and left behind before the signal (a
    library's `except ImportError: pass`) does not make the next safe point's stop an error."""
    with stopping.signals_handled():
        with pytest.raises(ValueError) as failed:
            with stopping.safe_points("the work"):
                try:
                    raise ValueError("row 3: bad")
                finally:  # the cleanup on the way up
                    send(signal.SIGTERM)
        assert stopping.error_before_signal(failed.value) is failed.value
    with stopping.signals_handled():
        with pytest.raises(stopping.Stopped) as stop:
            with stopping.safe_points("the work"):
                try:
                    raise ValueError("expected")
                except ValueError:
                    send(signal.SIGTERM)
        assert stop.value.agreed and stopping.error_before_signal(stop.value) is None


def test_a_signal_in_a_librarys_own_except_stays_a_stop_and_one_in_a_bad_inputs_cleanup_is_that_error(capsys):
    """A signal away from safe points inside a library's `except` (a cache miss's KeyError, a missing optional
    file's OSError) raises the Stopped there, that exception its context: no error of the run, so the run ends as a
    stop (its status and message). One in a bad input's cleanup is that error, said in one line (status 2)."""
    from spin_fast import cli

    def end(stop: stopping.Stopped) -> int:
        return cli.report_end(stop, cli.user_error_message)

    for handled in (KeyError("a cache miss"), FileNotFoundError("an optional file probed for")):
        with stopping.signals_handled():
            with pytest.raises(stopping.Stopped) as stop:
                try:
                    raise handled
                except Exception:
                    send(signal.SIGTERM)
            assert stopping.error_before_signal(stop.value) is handled
            assert end(stop.value) == 128 + signal.SIGTERM
            assert "the same command resumes the run" in capsys.readouterr().err
    with stopping.signals_handled():
        with pytest.raises(stopping.Stopped) as stop:
            try:
                raise ValueError("rows.jsonl line 3: no prompt")
            finally:
                send(signal.SIGTERM)
        assert end(stop.value) == 2
    assert capsys.readouterr().err == "spin-fast: rows.jsonl line 3: no prompt\n"


def test_an_error_raised_from_the_one_in_flight_when_the_signal_came_is_that_error_not_a_stop(capsys):
    """`raise ... from failure` after the `except` that kept it (examples.py's refused row, raised once the ranks
    compared) links the two by __cause__ alone: the bad input the signal found unwinding is still the run's end, said
    in one line (status 2, the line of the error raised for it, which names the row), not a stop whose resume would
    fail on it again."""
    from spin_fast import cli

    with stopping.signals_handled():
        with pytest.raises(ValueError) as ended:
            with stopping.safe_points("the work"):
                try:
                    try:
                        raise ValueError("no prompt")
                    finally:  # the cleanup on the way up
                        send(signal.SIGTERM)
                except ValueError as error:
                    failure = error
                raise ValueError(f"rows.jsonl line 3: cannot be tokenized: {failure}") from failure
        assert ended.value.__context__ is None and stopping.error_before_signal(ended.value) is failure
        assert cli.report_end(ended.value, cli.user_error_message) == 2
    assert capsys.readouterr().err == "spin-fast: rows.jsonl line 3: cannot be tokenized: no prompt\n"


def test_sigusr1_waits_in_a_warning_blocked_block_and_arrives_at_its_end():
    """Processes started in the block (vLLM's engine core) inherit the block: Slurm's warning to the whole group must
    not end them. This thread's own warning is kept for the block's end, then handled."""
    with stopping.signals_handled(), pytest.raises(stopping.Stopped, match="SIGUSR1 at the end of the work"):
        with stopping.safe_points("the work"), stopping.warning_blocked():
            assert signal.SIGUSR1 in signal.pthread_sigmask(signal.SIG_BLOCK, [])
            signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)  # to this thread: others may not block
            assert stopping.pending() == 0 and signal.SIGUSR1 in signal.sigpending()
    assert signal.SIGUSR1 not in signal.pthread_sigmask(signal.SIG_BLOCK, [])


@pytest.mark.parametrize("world_size", ["1", "2"])
def test_a_signal_before_any_work_that_surfaces_as_an_error_points_to_another_ranks_error_as_its_stop_does(
        monkeypatch, capsys, world_size):
    """The launcher's SIGTERM to the other ranks after one failed as the run started reaches their helpers too (vLLM's
    engine core): a helper's end, raised in the cleanup, reaches the command as an error instead of the Stopped. It is
    still a stop before any work, and must point to the other rank's error as that stop does under a launcher."""
    from spin_fast import cli

    monkeypatch.setenv("WORLD_SIZE", world_size)
    with stopping.signals_handled():
        with pytest.raises(RuntimeError) as ended:
            try:
                send(signal.SIGTERM)
            finally:  # the engine's shutdown, its core ended by the same signal
                raise RuntimeError("the engine core died")
        assert cli.report_end(ended.value, cli.user_error_message) == 143
    said = capsys.readouterr().err
    assert said.startswith("spin-fast: stopped by SIGTERM (RuntimeError: the engine core died); "), said
    assert ("if another rank failed, its error says why; else " in said) == (world_size == "2"), said
    assert said.rstrip().endswith("the same command resumes the run")


def test_an_error_the_run_raised_from_the_one_in_flight_when_the_signal_came_is_said_in_its_own_words(
        tmp_path, monkeypatch, capsys):
    """examples.tokenize_examples raises a row the chat template fails on as a ValueError naming the row, `from` the
    template's own error. A signal that came as the template failed (kept for the next safe point) must not hide that
    line: not behind the template's bare words, nor, where the template's error is no error a user can fix
    (jinja2's), as a stop whose resume meets the same row again. An error in a cleanup still leaves the first
    error's line."""
    import json

    from spin_fast import cli, examples
    from spin_fast.config import DataConfig
    from spin_fast.tokenizer import build_local_tokenizer

    tokenizer = build_local_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}{% if 'BOOM' in m['content'] %}"
                               "{{ raise_exception('no BOOM here') }}{% endif %}{% endfor %}" + tokenizer.chat_template)
    path = tmp_path / "data.jsonl"
    rows = [{"prompt": "Hi?", "response": "Hello."}, {"prompt": "Say it.", "response": "BOOM"}]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    data = DataConfig(source=str(path), max_length=64, max_prompt_length=32)
    refusal = examples.refusal

    def signalled_as_the_template_failed(*args):
        send(signal.SIGTERM)  # the batch's error in flight: kept for the next safe point
        return refusal(*args)

    monkeypatch.setattr(examples, "refusal", signalled_as_the_template_failed)
    with stopping.signals_handled():
        with pytest.raises(ValueError) as ended:
            with stopping.safe_points("the work"):
                examples.tokenize_examples(tokenizer, data, examples.read_examples(data, str(path)))
        assert stopping.error_before_signal(ended.value) is not None
        assert cli.report_end(ended.value, cli.user_error_message) == 2
    assert capsys.readouterr().err == f"spin-fast: {path} line 2: cannot be tokenized: no BOOM here\n"
    with stopping.signals_handled():
        with pytest.raises(OSError) as ended:
            with stopping.safe_points("the work"):
                try:
                    raise ValueError("rows.jsonl line 3: no prompt")
                finally:  # a cleanup that fails after the signal
                    send(signal.SIGTERM)
                    raise FileNotFoundError("/dev/shm/weights: gone")
        assert cli.report_end(ended.value, cli.user_error_message) == 2
    assert capsys.readouterr().err == "spin-fast: rows.jsonl line 3: no prompt\n"
