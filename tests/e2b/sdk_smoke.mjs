// E2B's unchanged JavaScript SDK against flintd (tests/tests/e2b.rs sets E2B_API_KEY, E2B_API_URL and
// E2B_SANDBOX_URL): create, run, files, kill.
import { Sandbox } from 'e2b'

function check(cond, what) {
  if (!cond) throw new Error(`check failed: ${what}`)
}

const sbx = await Sandbox.create('base', { timeoutMs: 300_000, metadata: { suite: 'flint-js' } })
const r = await sbx.commands.run('echo hi-from-js; whoami')
check(r.exitCode === 0 && r.stdout === 'hi-from-js\nuser\n', JSON.stringify(r))
await sbx.files.write('/home/user/js.txt', 'written by js')
check((await sbx.files.read('/home/user/js.txt')) === 'written by js', 'read back')
const names = (await sbx.files.list('/home/user')).map((e) => e.name)
check(names.includes('js.txt'), JSON.stringify(names))
// A watch is a server stream (WatchDir): events arrive through the callback.
const events = []
const handle = await sbx.files.watchDir('/home/user', (e) => events.push(`${e.type}:${e.name}`))
await sbx.files.write('/home/user/watched.txt', 'w')
for (let i = 0; i < 120 && !events.includes('create:watched.txt'); i++) await new Promise((r) => setTimeout(r, 500))
check(events.includes('create:watched.txt'), JSON.stringify(events))
await handle.stop()
check(await sbx.isRunning(), 'running')
check((await sbx.kill()) === undefined || true, 'kill')
check(!(await sbx.isRunning()), 'killed')
console.log('JS OK')
