#!/usr/bin/env bash
# Install the Label Studio server into its own virtualenv, .venv-labelstudio (git-ignored).
# The server (~1 GB, many pinned dependencies) never shares a venv with the library:
# the library talks to it over HTTP with label-studio-sdk. Idempotent: an existing,
# working install of the pinned version is left alone.
#   .ci/install_label_studio.sh            # then: .venv-labelstudio/bin/label-studio start ...
set -euo pipefail
cd "$(dirname "$0")/.."

LABEL_STUDIO_VERSION="${LABEL_STUDIO_VERSION:-1.23.2}"
# label-studio leaves sentry-sdk unpinned, and sentry-sdk 3.0 refuses the options it starts with
# ("Unknown option 'send_default_pii'"): the server exits at start.
SENTRY_SDK_VERSION="2.76.0"
VENV=".venv-labelstudio"
PYTHON="${PYTHON:-python3.11}"

installed_version() {
    "$VENV/bin/python" -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null || true
}

if [[ -x "$VENV/bin/label-studio" && "$(installed_version label-studio)" == "$LABEL_STUDIO_VERSION"
      && "$(installed_version sentry-sdk)" == "$SENTRY_SDK_VERSION" ]]; then
    echo "label-studio $LABEL_STUDIO_VERSION already installed in $VENV"
    exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet "label-studio==$LABEL_STUDIO_VERSION" "sentry-sdk==$SENTRY_SDK_VERSION"
echo "installed label-studio $(installed_version label-studio) in $VENV ($(du -sh "$VENV" | cut -f1))"
