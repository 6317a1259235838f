"""The one progress reporter: plain periodic lines off a terminal, nothing from other ranks."""

import re

from droppos.progress import Progress


def test_off_a_terminal_it_prints_plain_periodic_lines_and_the_final_state(capsys):
    every = Progress("eval-pos", 10, unit="images", plain_every_s=0.0)
    assert not every.interactive  # pytest's stderr is not a terminal
    every.advance(4, "model A")
    every.advance(6, "model A")
    every.close()  # the last state was printed already: no repeat
    quiet = Progress("eval-pos", 10, unit="images", plain_every_s=3600.0)
    quiet.advance(10, "model B")
    quiet.close()
    lines = capsys.readouterr().err.splitlines()
    assert [re.sub(r", [\d,.]+ images/s, about .* left", "", line) for line in lines] == [
        "eval-pos: 4/10 images (40.0%), model A", "eval-pos: 10/10 images (100.0%), model A"]


def test_a_caller_that_logs_itself_and_other_ranks_print_nothing_but_log_lines(capsys):
    loop = Progress("pretrain", 100, start=40, plain_every_s=None)
    loop.update(60)
    loop.log("step 60/100")
    loop.close()
    other = Progress("pretrain", 100, enabled=False, plain_every_s=0.0)
    other.update(50)
    other.log("never")
    other.close()
    assert capsys.readouterr().err.splitlines() == ["step 60/100"]
    assert loop.rate() > 0  # counted from where it started (40), not from 0
