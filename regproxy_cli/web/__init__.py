"""Web front ends over a loaded model: the local Gradio demo (:mod:`regproxy_cli.web.demo`). Gradio is optional
(``pip install 'regproxy[demo]'``) and imported only when a page is built."""
