"""The six backbones of the RegProxy paper (Table 2) and DINOv2/DINOv3 (dino.py) as ``regproxy.backbones`` plugins."""
