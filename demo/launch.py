"""Launch the imaging_ad web demo: ``python demo/launch.py [--help]``, the same as ``imaging-ad demo``.

The app itself is the package's ``imaging_ad.app``; this folder holds only this launcher and the example
images the Inspect tab offers."""

from imaging_ad.app.launcher import main

if __name__ == "__main__":
    raise SystemExit(main())
