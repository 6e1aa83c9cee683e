import subprocess
import sys

from roller.gctune import GEN0_THRESHOLD


def test_settle_heap_freezes_the_start_up_heap_and_spaces_young_collections():
    # In a child: freezing would also keep this test process's objects forever.
    code = (
        "import gc\n"
        "from roller.gctune import settle_heap\n"
        "before = gc.get_freeze_count()\n"
        "settle_heap()\n"
        "print(before, gc.get_freeze_count(), *gc.get_threshold())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1])).stdout
    before, frozen, gen0, gen1, gen2 = map(int, out.split())
    assert before == 0 and frozen > 1000
    assert (gen0, gen1, gen2) == (GEN0_THRESHOLD, 10, 10)
