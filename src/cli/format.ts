/**
 * Plain text for operators: aligned tables, sizes, percentages and rates. Colour only
 * when writing to a terminal (and NO_COLOR is unset); piped output is plain text.
 */
import { formatSize } from '../util/size.js';

export { formatSize };

export type Align = 'left' | 'right';

export interface Column {
  header: string;
  align?: Align;
}

export interface TableOptions {
  /** Colour the header and known state words (default: useColor()). */
  color?: boolean;
  /** Indent every line by this many spaces. */
  indent?: number;
}

/** Whether a stream should get ANSI colours. */
export function useColor(stream: NodeJS.WriteStream = process.stdout): boolean {
  return !!stream.isTTY && !process.env.NO_COLOR && process.env.TERM !== 'dumb';
}

const ANSI = { bold: '\x1b[1m', green: '\x1b[32m', yellow: '\x1b[33m', red: '\x1b[31m', reset: '\x1b[0m' };

const STATE_COLOR: Record<string, keyof typeof ANSI> = {
  ok: 'green', online: 'green', done: 'green',
  degraded: 'yellow', resyncing: 'yellow', running: 'yellow', booting: 'yellow', offline: 'yellow',
  failed: 'red', cancelled: 'red', mismatch: 'red',
};

/** Colours a state word on a terminal, leaves it as is otherwise. */
export function paintState(s: string, color: boolean): string {
  const c = STATE_COLOR[s];
  return color && c ? `${ANSI[c]}${s}${ANSI.reset}` : s;
}

/**
 * Columns separated by two spaces, each padded to its widest cell; trailing spaces are
 * trimmed. Cells that are state words are coloured when colour is on.
 */
export function table(columns: (string | Column)[], rows: (string | number)[][], o: TableOptions = {}): string {
  const color = o.color ?? useColor();
  const cols: Column[] = columns.map((c) => (typeof c === 'string' ? { header: c } : c));
  const cells = rows.map((r) => cols.map((_, i) => String(r[i] ?? '')));
  const widths = cols.map((c, i) => Math.max(c.header.length, ...cells.map((r) => r[i]!.length)));
  const pad = ' '.repeat(o.indent ?? 0);
  const line = (r: string[], header: boolean): string => {
    const parts = r.map((cell, i) => {
      const w = widths[i]!;
      const last = i === r.length - 1;
      const fill = ' '.repeat(w - cell.length);
      const shown = header ? (color ? `${ANSI.bold}${cell}${ANSI.reset}` : cell) : paintState(cell, color);
      if (cols[i]!.align === 'right') return fill + shown;
      return last ? shown : shown + fill;
    });
    return (pad + parts.join('  ')).replace(/\s+$/, '');
  };
  return [line(cols.map((c) => c.header), true), ...cells.map((r) => line(r, false))].join('\n');
}

/** Aligned "key: value" lines (for `show` commands); an empty key continues the line above. */
export function keyValues(pairs: [string, string | number][], indent = 0): string {
  const w = Math.max(0, ...pairs.map(([k]) => k.length + 1));
  const pad = ' '.repeat(indent);
  return pairs.map(([k, v]) => `${pad}${(k === '' ? '' : k + ':').padEnd(w)}  ${v}`).join('\n');
}

/** A fraction (0..1) as a percentage: 0.995 → "99.5%", 1 → "100%". */
export function formatFraction(f: number): string {
  return formatPercent(f * 100);
}

/** A percentage (0..100): 45 → "45%", 45.25 → "45.3%". */
export function formatPercent(p: number): string {
  if (!Number.isFinite(p)) return '-';
  const r = Math.round(p * 10) / 10;
  return `${Number.isInteger(r) ? r : r.toFixed(1)}%`;
}

/** Bytes per second: "120 MiB/s"; 0 → "-". */
export function formatRate(bytesPerSec: number): string {
  if (!Number.isFinite(bytesPerSec) || bytesPerSec <= 0) return '-';
  return `${formatSize(Math.round(bytesPerSec))}/s`;
}

/** Bytes with the exact count when it is not a round unit: "1 GiB", "1.5 KiB (1536 B)". */
export function formatSizeExact(bytes: number): string {
  const s = formatSize(bytes);
  return /\.\d/.test(s) ? `${s} (${bytes} B)` : s;
}

/** "host:port", "[::1]:port". */
export function formatHostPort(e: { host: string; port: number }): string {
  return e.host.includes(':') ? `[${e.host}]:${e.port}` : `${e.host}:${e.port}`;
}
