#include <stdio.h>

int main(void)
{
	printf("hello from C, compiled in a build step\n");
	return 0;
}
