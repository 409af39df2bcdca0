# run as the builder user in the context before building: archives with fixed owners and modes
set -e
chmod 0750 tree/sub
ln -sf a tree/link
tar --numeric-owner --owner=123 --group=456 -czf tree.tar.gz tree
tar --numeric-owner --owner=0 --group=0 -cf tree.tar -C tree .
gzip -c plain.txt > plain.txt.gz
