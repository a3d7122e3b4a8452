"""Privacy measured, not judged by eye: reconstruction quality of deobfuscators, fresh attacks, the
privacy-utility frontier over lambda."""
