"""The registry: every stage of the protocol, in the order they run. Adding a stage is its module and one line here.

    paper.py     c0, o0, drift, recovery, scores                       the paper's protocol
    privacy.py   privacy (the final O), privacy-o0, identify           the attack suite
    updates.py   drift-replicas, compatible-drift                      the update again, and as a compatible update
    robust.py    stand-ins, robust, control, attack-o0, attack-robust, robust-drift   a drift-robust obfuscator
    resync.py    remap, whitebox, blackbox                             bringing O0 back after the update
    live.py      live                                                  the update as the user sees it

`make run` (reproduce's default, `--stages main`) runs the paper's stages and the attack suite on the final
obfuscator; `--stages all`, a group (paper, privacy, beyond) or stage names select others.
"""

from __future__ import annotations

from ..stage import Stage, protocol_config
from . import live, paper, privacy, resync, robust, updates

STAGES: list[Stage] = [*paper.STAGES, *privacy.STAGES, *updates.STAGES, *robust.STAGES, *resync.STAGES, *live.STAGES]
ProtocolConfig = protocol_config(STAGES, __name__)
