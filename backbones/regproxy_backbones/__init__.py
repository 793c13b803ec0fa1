"""The six backbones of the RegProxy paper (Table 2) as ``regproxy.backbones`` entry-point plugins."""
