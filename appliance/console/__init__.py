"""The admin console under `/admin/`: the appliance's state, usage and keys in a browser.

Server-rendered HTML (Jinja2) with a little progressive JavaScript, every asset served from here (it
runs offline in a server room). Modules: `sessions` (sign-in sessions, CSRF tokens, the failed sign-in
throttle), `gate` (who may see what), `views` (each page's figures), `charts` (server-drawn SVG),
`routes` (the pages and forms; `install`). Keys change through `governance.keyadmin`, as with
`appliance keys`.
"""
