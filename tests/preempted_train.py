"""train.py on a machine that is preempted once: the sweep's program in the agent tests. On the
first attempt of the run launched with --checkpoint_every=0, a SIGTERM arrives during training
step $PREEMPT_AT_STEP (what SLURM or a spot machine sends); every other run is plain train.py."""
import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import model  # noqa: E402
import train  # noqa: E402

if __name__ == "__main__":
    marker = Path(os.environ["PREEMPT_MARKER"])
    if "--checkpoint_every=0" in sys.argv and not marker.exists():
        marker.touch()
        original, steps = model.MoELM.forward, []

        def forward(self, ids, targets=None):
            if self.training:
                steps.append(1)
                if len(steps) == int(os.environ["PREEMPT_AT_STEP"]):
                    os.kill(os.getpid(), signal.SIGTERM)
            return original(self, ids, targets)

        model.MoELM.forward = forward
    sys.exit(train.main(sys.argv[1:]))
