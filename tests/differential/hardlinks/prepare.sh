# hardlinks in the build context (git cannot store them)
set -e
ln ctx/a ctx/a-link
ln ctx/a ctx/sub/a-link2
