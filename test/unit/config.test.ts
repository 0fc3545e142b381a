import test from 'ava';
import { ConfigError, embeddedDefault, parseConfig, validateConfig } from '../../src/config/config.js';

const GOOD = `
cluster: { name: lab }
nodes:
  - { id: 1, nbd: "127.0.0.1:10809", admin: "127.0.0.1:10909", mesh: "127.0.0.1:11009" }
  - id: 2
    nbd: { host: 127.0.0.1, port: 10810 }
    admin: { port: 10910 }
    mesh: 127.0.0.1:11010
disks:
  - { id: d1, path: disks/d1.img, size: 1G }
  - { id: d2, path: /dev/loop7 }
metadata: { path: meta.img, size: 64M }
extentSize: 4M
`;

function problems(text: string, source = '/etc/dve/dve.yaml'): string[] {
  try {
    parseConfig(text, source);
  } catch (e) {
    if (e instanceof ConfigError) return e.problems;
    throw e;
  }
  return [];
}

test('a good YAML configuration parses, relative paths resolve against its directory', (t) => {
  const c = parseConfig(GOOD, '/etc/dve/dve.yaml');
  t.is(c.cluster.name, 'lab');
  t.deepEqual(c.nodes.map((n) => n.id), [1, 2]);
  t.deepEqual(c.nodes[1]!.nbd, { host: '127.0.0.1', port: 10810 });
  t.deepEqual(c.nodes[1]!.admin, { host: '127.0.0.1', port: 10910 });
  t.is(c.disks[0]!.path, '/etc/dve/disks/d1.img');
  t.is(c.disks[0]!.sizeBytes, 1024 ** 3);
  t.is(c.disks[1]!.sizeBytes, undefined);
  t.is(c.metadata.path, '/etc/dve/meta.img');
  t.is(c.extentBytes, 4 * 1024 * 1024);
});

test('JSON works the same', (t) => {
  const c = parseConfig(JSON.stringify({
    nodes: [{ id: 3, nbd: '127.0.0.1:1', admin: '127.0.0.1:2', mesh: '127.0.0.1:3' }],
    disks: [{ id: 'a', path: '/x/a.img', size: 1048576 }],
    metadata: { path: '/x/m.img' },
  }), '/x/c.json');
  t.is(c.nodes[0]!.id, 3);
  t.is(c.metadata.sizeBytes, 64 * 1024 * 1024);
});

test('every problem is reported, each naming the field and the value', (t) => {
  const p = problems(`
nodes:
  - { id: 99, nbd: "nohost", admin: "127.0.0.1:1", mesh: "127.0.0.1:1" }
disks:
  - { id: "bad id!", path: a.img, size: 12 parsecs }
  - { id: d2, path: a.img, colour: blue }
metadata: { path: m.img, size: 1K }
extentSize: 3M
`);
  const has = (re: RegExp): void => t.true(p.some((x) => re.test(x)), `${re} in\n${p.join('\n')}`);
  has(/^nodes\[0\]\.id: 99 is not an integer from 0 to 63/);
  has(/^nodes\[0\]\.nbd: "nohost" is not HOST:PORT/);
  has(/^nodes\[0\]\.mesh: "127\.0\.0\.1:1" is already used by nodes\[0\]\.admin/);
  has(/^disks\[0\]\.id: "bad id!" must be/);
  has(/^disks\[0\]\.size: "12 parsecs" is not a size/);
  has(/^disks\[1\]\.colour: unknown field/);
  has(/^disks\[1\]\.path: "a\.img" is used by another disk/);
  has(/^metadata\.size: "1K" must be at least 16M/);
  has(/^extentSize: "3M" must be a power of two/);
});

test('missing sections and wrong types are named', (t) => {
  const p = problems('nodes: 3\n');
  t.true(p.includes('nodes: 3 is not a list'));
  t.true(p.includes('disks: is missing'));
  t.true(p.includes('metadata: is missing'));
  t.deepEqual(problems('[1, 2]'), ['(top level): [1,2] is not a mapping']);
});

test('duplicate node and disk ids are refused', (t) => {
  const p = problems(`
nodes:
  - { id: 1, nbd: "127.0.0.1:1", admin: "127.0.0.1:2", mesh: "127.0.0.1:3" }
  - { id: 1, nbd: "127.0.0.1:4", admin: "127.0.0.1:5", mesh: "127.0.0.1:6" }
disks: [{ id: d, path: a }, { id: d, path: b }]
metadata: { path: m }
`);
  t.true(p.includes('nodes[1].id: 1 is used by another node'));
  t.true(p.includes('disks[1].id: "d" is used by another disk'));
});

test('syntax errors say which format failed', (t) => {
  t.regex(problems('{ nodes: [', '/x.json')[0]!, /^not valid JSON/);
  t.regex(problems('nodes: [1, 2', '/x.yaml')[0]!, /^not valid YAML/);
});

test('the embedded default validates and lives under the state directory', (t) => {
  const d = embeddedDefault('/var/lib/dve', { nodes: 3 });
  t.is(d.nodes.length, 3);
  t.true(d.disks.every((x) => x.path.startsWith('/var/lib/dve/')));
  const again = validateConfig({
    nodes: d.nodes.map((n) => ({ id: n.id, nbd: n.nbd, admin: n.admin, mesh: n.mesh })),
    disks: d.disks.map((x) => ({ id: x.id, path: x.path, size: x.sizeBytes })),
    metadata: { path: d.metadata.path, size: d.metadata.sizeBytes },
  }, 'embedded', '/');
  t.deepEqual(again.nodes, d.nodes);
});
