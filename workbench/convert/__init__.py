"""Weight converters: other checkpoints -> Qwen-VL-Chat's layout (openclip.py: OpenCLIP's ViT-bigG)."""
