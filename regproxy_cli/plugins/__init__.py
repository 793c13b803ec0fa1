"""Other CVPR 2022 ideas as RegProxy plugins, registered through entry points exactly as a third party's would be.

Each module holds one idea whole: its token classifier (``regproxy.classifiers``) and its training loss
(``regproxy.losses``). Painting blends any number of token channels, so these slot in without touching the model.
"""
