"""The demo room: a tiny Qwen-VL-Chat (tiny.py), its hand-set vision side (tiny_vision.py), the
synthetic shapes data set (synthetic.py) and `workbench demo` itself (runner.py). Nothing else in
the workbench depends on it; tests use it to build models and data with nothing downloaded."""
