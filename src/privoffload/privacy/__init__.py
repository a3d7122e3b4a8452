"""Privacy measured, not judged by eye: attacks on the obfuscator (attack.py) and Fig. 4's rebuilt images
(samples.py). Their scores (PSNR, SSIM) are computed by metrics.py."""
