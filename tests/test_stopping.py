"""debias.stopping: a signal is a request to stop at a safe point; a second one, later, aborts at once."""

import os
import signal
import subprocess
import sys
import time

import pytest

from debias.runtime import Ranks
from debias.stopping import AgreedStop, StopRequest, StopRequested


def test_the_first_signal_is_a_request_and_an_echo_is_the_same_one():
    before = signal.getsignal(signal.SIGINT)
    with StopRequest() as request:
        request.check()
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)  # within ECHO_SECONDS: torchrun forwarding the terminal's Ctrl-C
        time.sleep(0.01)
        assert request.signum == signal.SIGTERM
        with pytest.raises(StopRequested, match="SIGTERM"):
            request.check()
    assert signal.getsignal(signal.SIGINT) is before


def test_one_process_stops_after_the_step_the_signal_came_in():
    stop = AgreedStop(Ranks())
    with stop.request:
        assert not stop.after_step()
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert stop.after_step() and stop.signum == signal.SIGINT
    stop.close()


def test_a_second_signal_later_aborts_at_once():
    script = ("import os, signal, time\nimport debias.stopping as s\ns.ECHO_SECONDS = 0.1\n"
              "with s.StopRequest():\n    os.kill(os.getpid(), signal.SIGINT)\n    time.sleep(0.3)\n"
              "    os.kill(os.getpid(), signal.SIGINT)\n    time.sleep(5)\nprint('survived')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGINT and "survived" not in done.stdout, done.stderr
