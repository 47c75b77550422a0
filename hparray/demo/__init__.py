"""The demo: the bundled procedural sample videos (`sample_videos`), the training of the built-in
tiny LTX-Video (`model`, run by `python -m hparray.demo.train`) and its shipped weights
(`weights/demo-ltx`). Nothing at run time imports the training code."""
