#!/usr/bin/env python3
"""Fail when a production Rust function (outside tests) is longer than a limit (default 80
lines, the codebase's rule; issue #11). Reads every tracked .rs file outside tests/,
*/tests/ and benches/, up to its #[cfg(test)] module; counts a function from its `fn` line
to its closing brace, with strings, chars and comments left out of the brace count.

Usage: scripts/fn-length.py [LIMIT]
"""
import re
import subprocess
import sys

LIMIT = int(sys.argv[1]) if len(sys.argv) > 1 else 80
FN = re.compile(r'^\s*(pub(\([^)]*\))?\s+)?(async\s+)?(const\s+)?(unsafe\s+)?fn\s+(\w+)')


def code_of(line):
    line = re.sub(r"'(\\.|[^'\\])'", "''", line)
    line = re.sub(r'"(\\.|[^"\\])*"', '""', line)
    return line.split('//')[0]


def lengths(path):
    lines = open(path, encoding='utf-8').read().split('\n')
    end = next((i for i, l in enumerate(lines) if l.strip().startswith('#[cfg(test)]')), len(lines))
    for i, line in enumerate(lines[:end]):
        m = FN.match(line)
        if not m:
            continue
        depth, opened, j = 0, False, i
        while j < len(lines):
            code = code_of(lines[j])
            for ch in code:
                if ch == '{':
                    depth, opened = depth + 1, True
                elif ch == '}':
                    depth -= 1
            if (opened and depth == 0) or (not opened and code.rstrip().endswith(';')):
                break
            j += 1
        yield j - i + 1, i + 1, m.group(6)


def main():
    files = subprocess.check_output(['git', 'ls-files', '*.rs'], text=True).split()
    long = []
    for f in files:
        if f.startswith(('tests/', 'benches/')) or '/tests/' in f:
            continue
        long += [(n, f, line, name) for n, line, name in lengths(f) if n > LIMIT]
    for n, f, line, name in sorted(long, reverse=True):
        print(f'{f}:{line}: fn {name} is {n} lines (limit {LIMIT})')
    if long:
        sys.exit(1)
    print(f'no production function over {LIMIT} lines')


main()
