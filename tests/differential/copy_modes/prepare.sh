umask 002
mkdir -p tree/d/e
echo f > tree/d/f
echo g > tree/d/e/g
