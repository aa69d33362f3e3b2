"""run/lock.py: one writer per run, and the studio's `holder()` probe never refuses a real writer (audit L4)."""
import subprocess
import sys
import time

from tunesmith.errors import TunesmithError
from tunesmith.run.lock import RunLock, holder


def test_a_writer_is_not_refused_because_someone_is_looking(tmp_path):
    """Another process calls holder() on the folder in a loop (the studio lists runs that way) while this one takes
    and releases the lock 2000 times: it must get it every time (the probe used to make it 'in use' now and then)."""
    RunLock(tmp_path).acquire("test").release()  # the lock file exists, so holder() probes it
    prober = subprocess.Popen([sys.executable, "-c", "import sys\nfrom tunesmith.run.lock import holder\n"
                               "while True: holder(sys.argv[1])", str(tmp_path)])
    try:
        time.sleep(1.0)  # the prober is running
        assert prober.poll() is None
        refused = 0
        for _ in range(2000):
            try:
                RunLock(tmp_path).acquire("train").release()
            except TunesmithError:
                refused += 1
        assert refused == 0
    finally:
        prober.kill()
        prober.wait()


def test_a_real_holder_is_still_refused_and_named(tmp_path):
    lock = RunLock(tmp_path).acquire("train")
    try:
        assert "train by process" in holder(tmp_path)
        t0 = time.monotonic()
        try:
            RunLock(tmp_path).acquire("resume")
            raise AssertionError("a second writer got the lock")
        except TunesmithError as e:
            assert "is in use: train by process" in str(e)
        assert time.monotonic() - t0 < 2
    finally:
        lock.release()
    assert holder(tmp_path) is None
    RunLock(tmp_path).acquire("resume").release()
