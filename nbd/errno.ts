/**
 * The one errno table. Backends complete I/O with a host errno (negative, Linux
 * numbering, as the kernel returns it) or 0; the transmission phase answers the
 * client with an NBD wire error chosen here. The spec defines only a handful of
 * wire values; everything the spec does not name becomes NBD_EIO, as nbdkit does.
 */
import os from 'node:os';
import {
  NBD_EINVAL, NBD_EIO, NBD_ENOMEM, NBD_ENOSPC, NBD_ENOTSUP, NBD_EOVERFLOW, NBD_EPERM, NBD_ESHUTDOWN,
} from './constants.js';

const E = os.constants.errno;

/** Host errno (positive, e.g. E.ENOSPC) → NBD wire error. */
const HOST_TO_NBD = new Map<number, number>([
  [E.EPERM, NBD_EPERM],
  [E.EACCES, NBD_EPERM],
  [E.EROFS, NBD_EPERM],
  [E.EIO, NBD_EIO],
  [E.ENOMEM, NBD_ENOMEM],
  [E.EINVAL, NBD_EINVAL],
  [E.ENOSPC, NBD_ENOSPC],
  [E.EDQUOT, NBD_ENOSPC],
  [E.EFBIG, NBD_ENOSPC],
  [E.EOVERFLOW, NBD_EOVERFLOW],
  [E.ENOTSUP, NBD_ENOTSUP],
  [E.EOPNOTSUPP, NBD_ENOTSUP],
  [108 /* ESHUTDOWN on Linux */, NBD_ESHUTDOWN],
]);

/** Map a backend result (0, or -errno) to the NBD wire error (0 = success). */
export function nbdErrorFromResult(result: number): number {
  if (result >= 0) return 0;
  return HOST_TO_NBD.get(-result) ?? NBD_EIO;
}

/** Map a thrown Node error (with .errno negative or .code 'EIO') to a backend result. */
export function resultFromError(err: unknown): number {
  const e = err as NodeJS.ErrnoException | undefined;
  if (e && typeof e.errno === 'number' && e.errno !== 0) return e.errno < 0 ? e.errno : -e.errno;
  if (e && typeof e.code === 'string') {
    const n = (E as Record<string, number>)[e.code];
    if (typeof n === 'number') return -n;
  }
  return -E.EIO;
}

const NBD_ERROR_NAMES: Record<number, string> = {
  0: 'OK',
  [NBD_EPERM]: 'EPERM',
  [NBD_EIO]: 'EIO',
  [NBD_ENOMEM]: 'ENOMEM',
  [NBD_EINVAL]: 'EINVAL',
  [NBD_ENOSPC]: 'ENOSPC',
  [NBD_EOVERFLOW]: 'EOVERFLOW',
  [NBD_ENOTSUP]: 'ENOTSUP',
  [NBD_ESHUTDOWN]: 'ESHUTDOWN',
};
export function nbdErrorName(code: number): string {
  return NBD_ERROR_NAMES[code] ?? `NBD_ERROR(${code})`;
}

export const HOST_ERRNO = E;
