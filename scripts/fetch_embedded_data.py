"""Install real Fashion-MNIST from Debian (dataset-fashion-mnist) when we are root on Debian; otherwise say so.

The embedded dataset falls back to procedurally generated images when the package is absent, so this is optional.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

TARGET = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")

if TARGET.exists():
    sys.exit(0)
if shutil.which("apt-get") is None or os.geteuid() != 0:
    sys.stderr.write("Fashion-MNIST not installed (needs root + apt): the embedded dataset uses generated images\n")
    sys.exit(0)
env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
subprocess.run(["apt-get", "update", "-qq"], check=False, env=env)
subprocess.run(["apt-get", "install", "-y", "-qq", "dataset-fashion-mnist"], check=False, env=env)
